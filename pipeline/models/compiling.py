"""torch.compile for training (train.torch_compile): each decoder layer compiled on its own, as
torchtitan does, before DDP / FSDP2 wrap them.

    if compiling.enabled(cfg, device):
        compiling.compile_layers(policy, cfg.train.torch_compile_mode)
    graphs = compiling.graphs_compiled()     # cumulative, this process

The layers of a model share their code, so one graph serves them all; what makes Dynamo compile
again is a new shape. Rows are padded to a multiple of train.pad_to_multiple_of tokens
(``pad_multiple``: 64 by default when compiling), and the batch dimension is marked dynamic after
its first change (Dynamo's automatic dynamic shapes), so a run compiles a few graphs, not one per
step: the trainer logs ``compile/graphs`` and ``compile/recompiles`` (graphs compiled after the
first step) with each metrics record.
"""

from __future__ import annotations

import logging

import torch

from pipeline.config.schema import Config

log = logging.getLogger("dpo.train")

DEFAULT_PAD_MULTIPLE = 64


# Devices where a null train.torch_compile compiles: where it was measured to pay off. Not the CPU
# (docs/scaling.md: matmul-bound, 15-60 s per new shape for a few % per step); CUDA joins when
# bench/gpu_suite.py has measured it there.
COMPILE_BY_DEFAULT: frozenset[str] = frozenset()


def enabled(cfg: Config, device: str) -> bool:
    """train.torch_compile, or when null: whether ``device`` is in COMPILE_BY_DEFAULT."""
    if cfg.train.torch_compile is not None:
        return cfg.train.torch_compile
    return device in COMPILE_BY_DEFAULT


def pad_multiple(cfg: Config, compiled: bool) -> int | None:
    """Rows padded to a multiple of this many tokens: train.pad_to_multiple_of, or 64 when compiling."""
    if cfg.train.pad_to_multiple_of is not None:
        return cfg.train.pad_to_multiple_of
    return DEFAULT_PAD_MULTIPLE if compiled else None


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (a peft model around one included)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"train.torch_compile: {type(decoder).__name__} has no .layers list to compile; "
                         "set train.torch_compile: false")
    return layers


def compile_layers(model, mode: str | None = None) -> int:
    """Compile every decoder layer of ``model`` in place (``nn.Module.compile``: hooks and state
    dicts unchanged); returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(mode=None if mode in (None, "default") else mode)
    log.info("train: torch.compile on %d decoder layers (mode %s)", len(layers), mode or "default")
    return len(layers)


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
