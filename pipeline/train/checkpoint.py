"""Checkpoints as plain files: weights (safetensors), optimizer, scheduler, RNG, a JSON state.

    save_checkpoint(run_dir / "checkpoints" / "step-000100", Checkpoint(weights, optimizer, ...))
    checkpoint = read_checkpoint(path)

A checkpoint is written into a temporary folder and renamed into place, so a folder named
step-NNNNNN is always whole. It holds only what is trained: the whole model (model.safetensors),
or, when some parameters are frozen (LoRA), the trainable ones (trained.safetensors). Weights and
optimizer state are full (unsharded) tensors keyed by parameter name (distributed.full_state),
whatever the number of processes that trained: a run resumes on another number of GPUs.
Optimizer/scheduler/RNG files hold only tensors and plain values and are read back with
torch.load(weights_only=True). ``save_training`` gathers a trainer's state and writes it,
``restore_training`` puts a read one back (load_latest_checkpoint calls it).
"""

from __future__ import annotations

import functools
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

from pipeline.models.loading import load_tokenizer
from pipeline.train import distributed

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


# --- a trainer's state: gathered and written, read and put back ----------------------------------
# ``trainer``: trainer.py's Trainer (engine, optimizer, scheduler, policy, world, device, cfg, total_steps).


def save_training(trainer, run_dir: Path, step: int, run_fingerprint: str) -> None:
    """A checkpoint of ``step``: the full state gathered from every rank (a collective), with each
    rank's random generators (to resume exactly: dropout), written by rank 0. Under LoRA only the
    trained tensors; a full model's checkpoint also loads with from_pretrained (config, tokenizer)."""
    weights, optim = distributed.full_state(trainer.engine, trainer.optimizer, trainer.world)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state(trainer.device)
    ranks = trainer.world.gather(rng)  # each rank's generators, to resume exactly (dropout)
    if not trainer.world.main:
        return
    trained = set(distributed.get_trained_names(distributed.inner(trainer.engine)))
    partial = len(trained) < len(list(trainer.policy.parameters()))
    if partial:
        weights = {name: tensor for name, tensor in weights.items() if name in trained}
    state = {"step": step, "run_fingerprint": run_fingerprint, "total_steps": trainer.total_steps,
             "world_size": trainer.world.size}
    save_checkpoint(checkpoint_dir(run_dir, step), Checkpoint(
        weights, optim, trainer.scheduler.state_dict(), {**rng, "ranks": ranks}, state, partial),
        None if partial else functools.partial(_loadable, trainer))
    prune_checkpoints(run_dir, trainer.cfg.train.save_total_limit)


def _loadable(trainer, folder: Path) -> None:
    """Full fine-tuning: the files that make from_pretrained(checkpoint) work."""
    trainer.policy.config.save_pretrained(folder)
    if getattr(trainer.policy, "generation_config", None) is not None:
        trainer.policy.generation_config.save_pretrained(folder)
    load_tokenizer(trainer.cfg.model).save_pretrained(folder)


def restore_training(trainer, checkpoint: Checkpoint) -> None:
    """Put ``checkpoint`` back into the trainer: weights and optimizer (sharded as the engine
    shards them), schedule, and this rank's random generators (rank 0's on another world size)."""
    distributed.load_full_state(trainer.engine, trainer.optimizer, trainer.world, checkpoint.weights,
                                checkpoint.optimizer)
    trainer.scheduler.load_state_dict(checkpoint.scheduler)
    ranks = checkpoint.rng.get("ranks") or [checkpoint.rng]
    rng = ranks[trainer.world.rank] if len(ranks) == trainer.world.size else checkpoint.rng
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"], trainer.device)
