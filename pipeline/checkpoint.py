"""Checkpoints as plain files: weights (safetensors), optimizer, scheduler, RNG, a JSON state.

    save_checkpoint(run_dir / "checkpoints" / "step-000100", Checkpoint(weights, optimizer, ...))
    checkpoint = read_checkpoint(path)

A checkpoint is written into a temporary folder and renamed into place, so a folder named
step-NNNNNN is always whole. It holds only what is trained: the whole model (model.safetensors),
or, when some parameters are frozen (LoRA), the trainable ones (trained.safetensors). Weights and
optimizer state are full (unsharded) tensors keyed by parameter name (distributed.full_state),
whatever the number of processes that trained: a run resumes on another number of GPUs.
Optimizer/scheduler/RNG files hold only tensors and plain values and are read back with
torch.load(weights_only=True). This module only reads and writes; train.py gathers the state
and puts it back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("dpo.train")

STEP_RE = re.compile(r"^step-(\d{6})$")

MODEL = "model.safetensors"
TRAINED = "trained.safetensors"


@dataclass
class Checkpoint:
    weights: dict
    """Tensors by parameter name: all of the model's, or only the trained ones (``partial``)."""
    optimizer: dict
    scheduler: dict
    rng: dict
    state: dict
    partial: bool = False


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def _dedupe(weights: dict) -> tuple[dict, dict]:
    """(tensors with tied ones stored once, {alias: stored name}): safetensors refuses shared memory."""
    kept, aliases, seen = {}, {}, {}
    for name, tensor in weights.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        kept[name] = tensor.detach().contiguous()
    return kept, aliases


def save_checkpoint(path: Path, checkpoint: Checkpoint, extra: Callable[[Path], None] | None = None) -> None:
    """Write ``checkpoint`` to ``path`` atomically; ``extra(folder)`` adds files first (the
    config and tokenizer that make a full model's checkpoint load with from_pretrained)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.", dir=path.parent))
    try:
        tensors, aliases = _dedupe(checkpoint.weights)
        weights_file = tmp / (TRAINED if checkpoint.partial else MODEL)
        save_file(tensors, str(weights_file), metadata={"format": "pt", "aliases": json.dumps(aliases, sort_keys=True)})
        _sort_metadata(weights_file)
        torch.save(checkpoint.optimizer, tmp / "optimizer.pt")
        torch.save(checkpoint.scheduler, tmp / "scheduler.pt")
        torch.save(checkpoint.rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(checkpoint.state, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if path.exists():  # a stale copy of the same step from a run that died after saving it
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sort_metadata(path: Path) -> None:
    """safetensors writes its metadata in an order that changes from process to process (a Rust
    HashMap): sort it in place (the header keeps its length), so that the same tensors are the
    same bytes, in a resumed run as in an uninterrupted one."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        metadata = json.loads(raw).get("__metadata__") or {}
        written, ordered = (json.dumps({"__metadata__": m}, separators=(",", ":"), ensure_ascii=False)[1:-1].encode()
                            for m in (metadata, dict(sorted(metadata.items()))))
        if written != ordered and raw.count(written) == 1:
            fh.seek(8)
            fh.write(raw.replace(written, ordered))


def read_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    partial = (path / TRAINED).is_file()
    weights = {}
    with safe_open(str(path / (TRAINED if partial else MODEL)), framework="pt") as fh:
        for name in fh.keys():
            weights[name] = fh.get_tensor(name)
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        weights[alias] = weights[name]
    state = json.loads((path / "state.json").read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("state.json has no step")
    return Checkpoint(
        weights,
        torch.load(path / "optimizer.pt", weights_only=True),
        torch.load(path / "scheduler.pt", weights_only=True),
        torch.load(path / "rng.pt", weights_only=True),
        state,
        partial,
    )


def load_latest_checkpoint(run_dir: Path, restore: Callable[[Checkpoint], None]) -> tuple[Path, dict] | None:
    """Read the newest checkpoint that reads whole and ``restore`` it; a damaged one (truncated
    weights, bad state.json, tensors that do not fit the model) is skipped with a warning.
    Returns (path, state), None when no checkpoint loads."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            checkpoint = read_checkpoint(path)
            restore(checkpoint)
        except Exception as exc:  # safetensors, torch and json raise many types; all mean "damaged"
            log.warning("checkpoint %s cannot be loaded (%s: %s); trying the one before",
                        path, type(exc).__name__, str(exc)[:200])
            continue
        return path, checkpoint.state
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_RE.match(p.name))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
