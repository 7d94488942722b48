"""Scorers: what turns token ids into per-token reference log-probs, behind one interface.

    scorer = make_scorer(resolve_backend(cfg.score.backend, cfg.model), cfg, max_sequence)
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


VLLM_MEASURED_FASTER: tuple[tuple[str, float], ...] = ()
"""Where a measurement (bench/gpu_suite.py --quick, docs/benchmarks.md) found vLLM's scoring faster
than the transformers scorer on the same card: (a substring of the card's name, the largest model
measured, in billions of parameters). Empty: no GPU measurement yet, so auto picks transformers,
whose packed scorer computes each prompt once where vLLM's prompt_logprobs computes it for each
response (vllm PR 17251)."""


def resolve_backend(requested: str, model=None, level: int = logging.DEBUG) -> str:
    """The backend to use. auto: vllm only where it imports, a CUDA GPU is present and a measurement
    (VLLM_MEASURED_FASTER) says it scores faster on this card at this model size (``model``: the
    ModelConfig, for its size); else transformers. The choice and its reason are logged at ``level``
    (the score stage: INFO)."""
    if requested == "vllm":
        if not vllm_available():
            raise ScoreError(
                "score.backend=vllm but vLLM is not installed: pip install -e '.[vllm]' on a GPU "
                "machine, or set score.backend=transformers"
            )
        return "vllm"
    if requested == "transformers":
        return "transformers"
    choice, why = auto_backend(model)
    log.log(level, "score: backend auto: %s, %s", choice, why)
    return choice


def auto_backend(model=None) -> tuple[str, str]:
    """(backend, why) of score.backend auto here, for ``model`` (a ModelConfig, or None)."""
    import torch

    if not torch.cuda.is_available():
        return "transformers", "no CUDA GPU"
    if not vllm_available():
        return "transformers", "vLLM is not installed"
    card = torch.cuda.get_device_name()
    size = model_billions(model)
    for name, largest in VLLM_MEASURED_FASTER:
        if name in card and (size is None or size <= largest):
            return "vllm", f"measured faster than transformers on {name} up to {largest:g}B parameters"
    return "transformers", (f"no measurement shows vLLM scoring faster on {card}"
                            f"{f' for a {size:.2g}B-parameter model' if size else ''} (docs/benchmarks.md); "
                            "score.backend=vllm uses it anyway")


def model_billions(model) -> float | None:
    """A causal LM's size in billions of parameters, estimated from its config.json (12 x layers x
    hidden^2 + vocab x hidden); None when there is no local config to read."""
    import json
    from pathlib import Path

    if model is None or not (Path(model.path) / "config.json").is_file():
        return None
    try:
        c = json.loads((Path(model.path) / "config.json").read_text())
        hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (12 * layers * hidden * hidden + vocab * hidden) / 1e9


def make_scorer(backend: str, cfg: Config, max_sequence: int, settings: dict | None = None) -> Scorer:
    """A loaded scorer. ``settings``: a cache's recorded settings, to reproduce its batches."""
    if backend == "vllm":
        from pipeline.logprobs.backends.vllm import VllmScorer

        return VllmScorer(cfg, max_sequence)
    from pipeline.logprobs.backends.transformers_backend import TransformersScorer

    return TransformersScorer(cfg, settings)


__all__ = ["BACKENDS", "VLLM_MEASURED_FASTER", "Progress", "ScoreError", "Scorer", "auto_backend", "make_scorer",
           "model_billions", "resolve_backend", "vllm_available"]
