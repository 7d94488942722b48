"""Scorers: what turns token ids into per-token reference log-probs, behind one interface.

    scorer = make_scorer(resolve_backend(cfg.score.backend), cfg, max_sequence)
    chosen, rejected = scorer.score_pairs(prompts, chosens, rejecteds)

Two backends: ``transformers`` (CPU or GPU; the cross-check) and ``vllm`` (GPU). Both return
float32 arrays of log pi(y_j | x, y_<j) for every response token, in input order. A scorer also
reports ``settings``: everything that can change low-order bits of its numbers (device, batch
budget, prefix sharing), resolved, so that the score stage records it and an audit can reproduce
the very same batches.
"""

from __future__ import annotations

import importlib.util
import logging

from pipeline.config.schema import Config
from pipeline.errors import ScoreError
from pipeline.logprobs.backends.base import Progress, Scorer

log = logging.getLogger("dpo.score")

BACKENDS = ("transformers", "vllm")

def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(requested: str) -> str:
    """The backend to use; "auto" means vllm when it imports and a CUDA GPU is present."""
    if requested == "vllm":
        if not vllm_available():
            raise ScoreError(
                "score.backend=vllm but vLLM is not installed: pip install -e '.[vllm]' on a GPU "
                "machine, or set score.backend=transformers"
            )
        return "vllm"
    if requested == "transformers":
        return "transformers"
    import torch

    choice = "vllm" if vllm_available() and torch.cuda.is_available() else "transformers"
    log.debug("score: backend auto -> %s", choice)
    return choice


def make_scorer(backend: str, cfg: Config, max_sequence: int, settings: dict | None = None) -> Scorer:
    """A loaded scorer. ``settings``: a cache's recorded settings, to reproduce its batches."""
    if backend == "vllm":
        from pipeline.logprobs.backends.vllm import VllmScorer

        return VllmScorer(cfg, max_sequence)
    from pipeline.logprobs.backends.transformers_backend import TransformersScorer

    return TransformersScorer(cfg, settings)


__all__ = ["BACKENDS", "Progress", "ScoreError", "Scorer", "make_scorer", "resolve_backend", "vllm_available"]
