"""The transformers scoring backend: sorted by length, batched by a token budget, prefix sharing.

Runs on CPU or GPU with the one log-prob function of ``pipeline.logprobs.response``; it is also the
cross-check of the vLLM backend and what the audit re-scores with.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.config.schema import Config
from pipeline.errors import ModelError, ScoreError
from pipeline.logprobs.backends.base import Progress
from pipeline.models.loading import pick_device

log = logging.getLogger("dpo.score")

# score.tokens_per_batch when unset: small batches stay in the CPU's caches (bench/score_bench.py
# measured 2048 fastest of 2048/4096/8192 on 2 cores); a GPU wants large ones.
DEFAULT_TOKENS_PER_BATCH = {"cpu": 2048, "cuda": 32768}
# Tolerance of the LM-head self-check (our hidden-state path vs the model's own logits), by dtype.
HEAD_CHECK_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


def own_logps(model, prompts: list[list[int]], responses: list[list[int]], device: str) -> list[np.ndarray]:
    """Per-token log-probs of each response after its prompt from the model's own forward (its
    full logits, with whatever it does to them), one right-padded batch (``logprobs.pack``): what
    the scorer's path must reproduce (the self-check's reference)."""
    import torch

    from pipeline.logprobs.response import pack

    batch = pack(prompts, responses, pad_id=0)
    with torch.inference_mode():
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                       use_cache=False).logits
        logps = torch.log_softmax(logits.float(), dim=-1).cpu()
    values = logps[batch.rows, batch.cols, batch.targets].numpy()
    return np.split(values, np.cumsum(batch.lengths)[:-1])


def resolve_device(requested: str) -> str:
    return pick_device(requested, "score.device", ScoreError)


class TransformersScorer:
    """Scores with a transformers causal LM: sorted by length, batched by a token budget."""

    name = "transformers"

    def __init__(self, cfg: Config, settings: dict | None = None):
        """settings: a cache's recorded {"tokens_per_batch", "prefix_sharing", "packing"} to
        reproduce (a cache from before padding-free batches has no "packing": one pair per row)."""
        from pipeline.logprobs.response import default_packing, supports_shared_prefix
        from pipeline.models.loading import load_causal_lm

        settings = settings or {}
        self.device = device = resolve_device(cfg.score.device)
        self.tokens_per_batch = (
            settings.get("tokens_per_batch")
            or cfg.score.tokens_per_batch
            or DEFAULT_TOKENS_PER_BATCH[device]
        )
        want_sharing = settings.get("prefix_sharing", cfg.score.prefix_sharing)
        self.model = load_causal_lm(cfg.model, device)
        self.prefix_sharing = want_sharing and supports_shared_prefix(self.model)
        if settings:
            self.packing = settings.get("packing", "none")
        else:
            self.packing = default_packing(self.model) if cfg.score.padding_free else "none"
        if want_sharing and not self.prefix_sharing:
            attention = self.model.config._attn_implementation
            log.info("score: %s attention takes no custom masks; prefix sharing off", attention)
        self._self_check(cfg)

    def _self_check(self, cfg: Config) -> None:
        """One short probe (three pairs: packed, the two short ones share a row), scored the way
        the cache will be, against the model's own forward (its full logits, whatever it does to
        them): proves both that our LM-head path reproduces the model and that prefix sharing
        (and packing) change nothing, in two forward passes. Only a disagreement costs a third
        (no sharing), which tells which is wrong: the head path (ModelError) or sharing (then
        switched off)."""
        tolerance = HEAD_CHECK_TOLERANCE[cfg.model.dtype]
        probe = list(range(1, min(17, self.model.config.vocab_size)))
        prompts, chosens, rejecteds = ([probe[:5], probe[:2], probe[2:4]], [probe[5:11], probe[5:6], probe[6:8]],
                                       [probe[11:16], probe[8:10], probe[10:11]])
        reference = own_logps(self.model, prompts + prompts, chosens + rejecteds, self.device)

        def diff(values) -> float:
            return max(float(np.abs(a - b).max()) for a, b in zip(values, reference))

        if self.prefix_sharing:
            chosen, rejected = self.score_shared(prompts, chosens, rejecteds)
            ours = chosen + rejected
        else:
            ours = self.score(prompts + prompts, chosens + rejecteds)
        if diff(ours) <= tolerance:
            return
        separate = self.score(prompts + prompts, chosens + rejecteds) if self.prefix_sharing else ours
        if diff(separate) > tolerance:
            raise ModelError(
                f"the model in {cfg.model.path} post-processes its logits in a way the scorer does "
                f"not reproduce (max |diff| {diff(separate):.3g} nats on a probe): please report the "
                "architecture so it can be supported"
            )
        shared = max(float(np.abs(a - b).max()) for a, b in zip(separate, ours))
        if shared > tolerance:
            log.warning("score: prefix sharing disagrees on a probe (%.3g); switched off", shared)
            self.prefix_sharing = False

    @property
    def settings(self) -> dict:
        return {"device": self.device, "tokens_per_batch": self.tokens_per_batch,
                "prefix_sharing": self.prefix_sharing, "packing": self.packing}

    def batches(self, lengths: list[int], flat: bool = False) -> list[list[int]]:
        """Sequence indices grouped so that rows x longest <= tokens_per_batch (``flat``: the sum
        of the lengths, for one padding-free row), longest first."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        groups: list[list[int]] = []
        current: list[int] = []
        total = 0
        for i in order:
            width = lengths[current[0]] if current else lengths[i]
            cost = total + lengths[i] if flat else width * (len(current) + 1)
            if current and cost > self.tokens_per_batch:
                total = 0
                groups.append(current)
                current = []
            current.append(i)
            total += lengths[i]
        if current:
            groups.append(current)
        return groups

    def score_pairs(self, prompts, chosens, rejecteds, progress=None, rows=None):
        """(chosen, rejected) per-token log-prob arrays for each example, in input order.

        rows: only compute the batches that hold these examples (None elsewhere in the output);
        the batches are the ones a full call makes, so the values are bit-identical to it.
        """
        if self.prefix_sharing:
            return self.score_shared(prompts, chosens, rejecteds, progress, rows)
        only = None if rows is None else set(rows) | {i + len(prompts) for i in rows}
        values = self.score(prompts + prompts, chosens + rejecteds, progress, only)
        return values[: len(prompts)], values[len(prompts) :]

    def _batched(self, lengths: list[int], pack_group, only: set[int] | None = None, flat: bool = False):
        """Yield (group, per-response log-prob arrays) for each batch of the full call's batching,
        skipping batches that hold none of ``only``; pack_group(group, packed) builds the batch.

        A packed batch with a non-finite value is computed again one pair per row: a NaN in one
        pair's hidden states reaches the others of its row through the masked attention
        (0 x NaN), and the stage must name only the examples that are really non-finite."""
        import torch

        from pipeline.logprobs.response import response_logps

        def run(batch):
            with torch.inference_mode():
                return response_logps(self.model, batch.to(self.device)).cpu().numpy()

        for group in self.batches(lengths, flat):
            if only is not None and not only.intersection(group):
                continue
            batch = pack_group(group, True)
            values = run(batch)
            if not np.isfinite(values).all() and len(group) > 1:
                batch = pack_group(group, False)
                values = run(batch)
            yield group, np.split(values, np.cumsum(batch.lengths)[:-1])

    def score_shared(self, prompts, chosens, rejecteds, progress=None, rows=None):
        """(chosen, rejected) per-token log-prob arrays, each prompt run once for both responses
        (prefix sharing): what ``score_pairs`` does when ``prefix_sharing`` is on, and what the
        self-check compares with ``own_logps``. ``progress`` and ``rows`` as in score_pairs."""
        from pipeline.logprobs.response import pack_pairs

        def pack_group(group, packed):
            picked = [prompts[i] for i in group], [chosens[i] for i in group], [rejecteds[i] for i in group]
            return pack_pairs(*picked, pad_id=0, packing=self.packing if packed else "none")

        lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosens, rejecteds)]
        chosen_out: list = [None] * len(prompts)
        rejected_out: list = [None] * len(prompts)
        for group, parts in self._batched(lengths, pack_group, None if rows is None else set(rows),
                                          flat=self.packing == "flat"):
            for k, i in enumerate(group):
                chosen_out[i], rejected_out[i] = parts[2 * k], parts[2 * k + 1]
            if progress:
                through_model = sum(2 * len(prompts[i]) + len(chosens[i]) + len(rejecteds[i]) for i in group)
                progress(2 * len(group), sum(map(len, parts)), through_model)
        return chosen_out, rejected_out

    def score(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        progress: Progress | None = None,
        only: set[int] | None = None,
    ) -> list[np.ndarray]:
        """Per-token log-probs (float32 arrays) of each response after its prompt, in input order.

        only: compute just the batches holding these sequences (None elsewhere in the output).
        """
        from pipeline.logprobs.response import pack

        def pack_group(group, packed):
            return pack([prompts[i] for i in group], [responses[i] for i in group], pad_id=0)

        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        out: list[np.ndarray | None] = [None] * len(prompts)
        for group, parts in self._batched(lengths, pack_group, only):
            for i, chunk in zip(group, parts):
                out[i] = chunk
            if progress:
                progress(len(group), sum(map(len, parts)), sum(lengths[i] for i in group))
        return out  # type: ignore[return-value]


