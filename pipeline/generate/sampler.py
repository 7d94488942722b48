"""The transformers sampler: completions of token-id prompts, each drawn from its own seeded generator.

    sampler = TransformersSampler(load_causal_lm(model_cfg, "cpu"), stop=(2,), pad_id=0, batch_size=32)
    seeds = [sequence_seed(cfg.generate.seed, pid, k) for pid in prompt_ids for k in range(4)]
    completions = sampler.sample(prompts, seeds, Sampling(temperature=1.0, top_p=0.95, max_new_tokens=64))
    completions[0].token_ids, completions[0].finish_reason     # without the stop token; "stop" | "length"

A decoding loop of its own rather than ``model.generate``, whose sampling draws from the global
RNG, so that a batch's composition changed the tokens: here every sequence draws exactly one
number per step from its own ``torch.Generator`` (on the CPU, seeded with the sequence's seed), and
its next token is the inverse CDF of that number over the filtered distribution. Prompts are
batched (sorted by length to limit padding), LEFT padded with an attention mask and position ids
counted from the mask, decoded with a KV cache (``DynamicCache``), reading the logits of the last
position only; the distribution is computed in float32 (temperature, then top_p: the smallest set
of most likely tokens whose probability reaches top_p, the most likely always kept; temperature 0:
argmax). A sequence stops at a stop id (the tokenizer's EOS, the model's generation_config
eos_token_id) or after max_new_tokens; finished sequences run on, padded, until the whole batch
has finished. On a CPU in float32 the tokens do not depend on the batch (tests/generate). Part of
the generate stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.store import fingerprint

ProgressFn = Callable[[int, int], None]
"""progress(sequences finished, tokens generated) after each batch."""


@dataclass(frozen=True)
class Sampling:
    """How a token is drawn, and how many at most."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256

    @classmethod
    def of(cls, generate_cfg) -> "Sampling":
        return cls(generate_cfg.temperature, generate_cfg.top_p, generate_cfg.max_new_tokens)


@dataclass
class Completion:
    token_ids: list[int]
    """The sampled tokens, without the stop token."""
    finish_reason: str
    """stop: a stop token was sampled; length: max_new_tokens reached."""


def sequence_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The seed of one (prompt, sample): 60 bits of the fingerprint of (seed, prompt id, sample)."""
    return int(fingerprint([seed, prompt_id, sample])[:15], 16)


def stop_ids(tokenizer, model_dir: str | Path) -> tuple[int, ...]:
    """The ids that end a completion: the tokenizer's EOS and the model's generation_config.json
    eos_token_id (an id or a list), sorted."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        config = json.loads((Path(model_dir) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    ids.update(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
    return tuple(sorted(ids))


def next_tokens(logits, sampling: Sampling, generators: list):
    """One token per row of ``logits`` [rows, vocab]: argmax at temperature 0, else the inverse CDF
    of one uniform draw from each row's generator over its top_p-filtered distribution (float32)."""
    import torch

    logits = logits.float()
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = (sorted_p.cumsum(dim=-1) - sorted_p) < sampling.top_p  # the most likely token always
    sorted_p = sorted_p * keep
    cdf = sorted_p.cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    u = draws.to(device=cdf.device, dtype=torch.float32) * cdf[:, -1]
    index = torch.searchsorted(cdf, u[:, None].contiguous())
    index = torch.minimum(index, keep.sum(dim=-1, keepdim=True) - 1)
    return order.gather(1, index).squeeze(1)


class TransformersSampler:
    """Completions of token-id prompts with a transformers causal LM (see the module docstring)."""

    name = "transformers"

    def __init__(self, model, stop: tuple[int, ...], pad_id: int, batch_size: int):
        self.model, self.stop, self.pad_id, self.batch_size = model, frozenset(stop), pad_id, batch_size
        self.device = next(model.parameters()).device

    def sample(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling,
               progress: ProgressFn | None = None) -> list[Completion]:
        """One completion per (prompt, seed), in input order."""
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        out: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            completions = self.sample_batch([prompts[i] for i in batch], [seeds[i] for i in batch], sampling)
            for i, completion in zip(batch, completions):
                out[i] = completion
            if progress:
                progress(len(batch), sum(len(c.token_ids) for c in completions))
        return out

    def sample_batch(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling) -> list[Completion]:
        """One batch: left padded, decoded step by step with a KV cache until every row finished."""
        import torch
        from transformers import DynamicCache

        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        ids, mask = self._left_padded(prompts)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        tokens: list[list[int]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        with torch.inference_mode():
            for _ in range(sampling.max_new_tokens):
                logits = self._last_logits(ids, mask, positions, cache)
                chosen = next_tokens(logits, sampling, generators)
                self._record(chosen.tolist(), tokens, reasons, sampling.max_new_tokens)
                if all(reasons):
                    break
                done = torch.tensor([r is not None for r in reasons], device=self.device)
                ids = torch.where(done, torch.full_like(chosen, self.pad_id), chosen)[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
        return [Completion(t, r) for t, r in zip(tokens, reasons)]

    def _left_padded(self, prompts: list[list[int]]):
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _last_logits(self, ids, mask, positions, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _record(self, chosen: list[int], tokens: list[list[int]], reasons: list, max_new: int) -> None:
        for row, token in enumerate(chosen):
            if reasons[row] is not None:
                continue  # finished: its padded steps are ignored
            if token in self.stop:
                reasons[row] = "stop"
                continue
            tokens[row].append(token)
            if len(tokens[row]) >= max_new:
                reasons[row] = "length"
