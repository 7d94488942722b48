"""Checkpoints as plain functions: weights (safetensors), optimizer, scheduler, RNG, a JSON state.

    save_checkpoint(run_dir / "checkpoints" / "step-000100", model, optimizer, scheduler, state)
    state = load_checkpoint(path, model, optimizer, scheduler)

A checkpoint is written into a temporary folder and renamed into place, so a folder named
step-NNNNNN is always whole. Checkpoints hold only what is trained: the whole model
(model.safetensors), or, when some parameters are frozen (LoRA), the trainable ones by name
(trained.safetensors). Optimizer/scheduler/RNG files hold only tensors and plain values
and are read back with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

log = logging.getLogger("dpo.train")

STEP_RE = re.compile(r"^step-(\d{6})$")


TRAINED = "trained.safetensors"


def _trained(model) -> dict | None:
    """The trainable parameters by name when some are frozen; None when the whole model trains."""
    params = dict(model.named_parameters())
    trained = {name: p for name, p in params.items() if p.requires_grad}
    return None if len(trained) == len(params) else trained


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.", dir=path.parent))
    try:
        trained = _trained(model)
        if trained is None:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        else:
            save_file({name: p.detach().contiguous() for name, p in trained.items()}, str(tmp / TRAINED))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        for file in tmp.iterdir():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if path.exists():  # a stale copy of the same step from a run that died after saving it
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    path = Path(path)
    trained = _trained(model)
    if trained is None:
        load_model(model, str(path / "model.safetensors"))
    else:
        tensors = load_file(str(path / TRAINED))
        if set(tensors) != set(trained):
            raise ValueError(f"{TRAINED} holds other tensors than the model trains")
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())


def load_latest_checkpoint(run_dir: Path, model, optimizer, scheduler) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that loads whole; a damaged one (truncated weights, bad
    state.json) is skipped with a warning. None when no checkpoint loads."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path, model, optimizer, scheduler)
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError("state.json has no step")
        except Exception as exc:  # safetensors, torch and json raise many types; all mean "damaged"
            log.warning("checkpoint %s cannot be loaded (%s: %s); trying the one before",
                        path, type(exc).__name__, str(exc)[:200])
            continue
        return path, state
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_RE.match(p.name))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
