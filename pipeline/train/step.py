"""One optimizer step, without a host sync: the metrics stay on the device until a logged step
reads them all at once (``read_records``), and the non-finite guard skips the update on the
device.

    record = train_step(trainer, step)             # tensors on the device, nothing read
    records = read_records(trainer, window, seconds)   # one transfer: floats, or TrainError

The guard's promise: a step whose loss or gradient norm is not finite does not change the
weights, nor does any step after it (``trainer.StepGuard``: a flag on the device that the optimizer reads
as its ``found_inf``, as it does under GradScaler); the next read raises TrainError naming the
first such step and its batch ids. With an optimizer that cannot skip on the device (one without
``found_inf`` support), the guard reads the flag before the update: one sync per step.
"""

from __future__ import annotations

import math
import time

import torch

from pipeline.train import distributed
from pipeline.models import precision
from pipeline.train.trainer import Trainer
from pipeline.train.batches import TrainError, batch_indices
from pipeline.train.loss import add_sums, token_count


def train_step(trainer: Trainer, step: int) -> dict:
    """One optimizer step (0-based ``step``) on its batch; returns the step's metrics record, its
    sums and gradient norm 0-dim tensors on the device (``read_records`` reads them).

    A non-finite loss or gradient norm leaves the weights untouched (see the module docstring).
    """
    train_cfg, split = trainer.cfg.train, trainer.splits["train"]
    started = time.perf_counter()
    index = batch_indices(step, trainer.batch, len(split), train_cfg.seed)  # the global batch
    totals: dict = {}
    # Sum of per-pair losses x world size / effective batch: the micro-batch gradients add up, and
    # DDP / FSDP2 average them over the ranks, to the gradient of the mean loss over the batch,
    # however the pairs are grouped into micro-batches.
    scale = trainer.world.size / trainer.batch
    groups = trainer.micro_batches(index)
    for k, micro_index in enumerate(groups):
        with distributed.accumulating(trainer.engine, sync=k == len(groups) - 1):
            loss, sums = trainer.micro_loss(split, micro_index, scale)
            loss.backward()
        add_sums(totals, sums)  # on the device: no host sync per micro-batch
    totals = trainer.world.sum(totals)
    clip = train_cfg.max_grad_norm if train_cfg.max_grad_norm > 0 else float("inf")
    norm = distributed.clip_grad_norm(trainer.engine.parameters(), clip)
    guard = trainer.guard
    guard.record(~(torch.isfinite(totals["loss"]) & torch.isfinite(norm)), step)
    lr = trainer.scheduler.get_last_lr()[0]
    precision.guarded_step(trainer.optimizer, guard.failed)
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    precision.release_memory(trainer.device)  # RSS flat across steps on CPU
    return {"step": step + 1, "epoch": (step + 1) * trainer.batch / len(split),
            **{k: v / trainer.batch for k, v in totals.items()}, "grad_norm": norm, "learning_rate": lr,
            "tokens": token_count(split, index), "seconds": time.perf_counter() - started}


def read_records(trainer: Trainer, records: list[dict], seconds: float | None = None) -> list[dict]:
    """``records`` (from train_step) with their tensors read as floats, in one transfer, with
    ``seconds`` (the wall time they took together, read included; None: each step's own time)
    spread evenly and tokens/s. Raises TrainError when a step was non-finite (StepGuard)."""
    guard = trainer.guard
    keys = [(n, key) for n, record in enumerate(records) for key, value in record.items()
            if isinstance(value, torch.Tensor)]
    values = [records[n][key].detach().to(guard.failed.device, torch.float64).reshape(()) for n, key in keys]
    read = torch.stack([guard.failed.double(), guard.first.double(), *values]).tolist()
    failed, first, read = read[0], int(read[1]), read[2:]
    out = [dict(record) for record in records]
    for (n, key), value in zip(keys, read):
        out[n][key] = value
    if failed:
        trainer.optimizer.zero_grad(set_to_none=True)
        raise _non_finite(trainer, first, next((r for r in out if r["step"] == first + 1), None))
    share = None if seconds is None else seconds / max(len(out), 1)
    for record in out:
        record["seconds"] = record["seconds"] if share is None else share
        record["tokens/s"] = record.pop("tokens") / record["seconds"]
    return out


def _non_finite(trainer: Trainer, step: int, record: dict | None) -> TrainError:
    split = trainer.splits["train"]
    index = batch_indices(step, trainer.batch, len(split), trainer.cfg.train.seed)
    ids = ", ".join(split.ids[i] for i in index[:8])
    what = "gradient norm" if record is not None and math.isfinite(record["loss"]) else "loss"
    return TrainError(
        f"non-finite {what} at step {step + 1} (batch ids {ids}{'...' if len(index) > 8 else ''}); the weights "
        "were not updated. Lower train.learning_rate or train.beta, check those examples, then --resume from the "
        "last checkpoint"
    )


def run_step(trainer: Trainer, step: int) -> dict:
    """``train_step`` then ``read_records`` of its record alone (one sync: what a benchmark that
    times each step, or a test, wants)."""
    started = time.perf_counter()
    record = train_step(trainer, step)
    return read_records(trainer, [record], time.perf_counter() - started)[0]
