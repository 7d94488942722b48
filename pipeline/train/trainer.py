"""The trainer: the state of one run (policy, engine, optimizer, schedule, data, rank) and its step:
the step's pairs in micro-batches, each one forward pass and its backward, then clipping, the
optimizer and the schedule, without a host sync; ``build_trainer`` makes one from a config, the
splits and a loaded policy (DDP / FSDP2, AdamW, schedule, torch.compile).

    trainer = build_trainer(cfg, splits, policy, world)
    record = trainer.train_step(step)                 # tensors on the device, nothing read
    records = trainer.read_records(window, seconds)   # one transfer: floats, or TrainError
    record = trainer.run_step(step)                   # both, one step (what a benchmark times)

The metrics stay on the device until a logged step reads them all at once (metrics_log.py decides
when). The guard's promise: a step whose loss or gradient norm is not finite does not change the
weights, nor does any step after it (``StepGuard``: a flag on the device that the optimizer reads
as its ``found_inf``, as it does under GradScaler); the next read raises TrainError naming the
first such step and its batch ids. With an optimizer that cannot skip on the device (one without
``found_inf`` support), the guard reads the flag before the update: one sync per step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.config.schema import Config
from pipeline.errors import TrainError
from pipeline.logprobs.response import (
    PairOptions,
    PairTokens,
    pair_loss,
    pair_token_logps,
    supports_shared_prefix,
)
from pipeline.models import compiling, precision
from pipeline.storage import paths
from pipeline.train import distributed
from pipeline.train.batches import Split, auto_token_budget, batch_indices, token_count, token_micro_batches
from pipeline.train.distributed import World
from pipeline.train.loss import add_sums, cached_reference, ld_reference, pair_objective
from pipeline.train.schedule import lr_scheduler, total_steps

log = logging.getLogger("dpo.train")


class StepGuard:
    """Whether a step was non-finite (``failed``, 0-dim float32 0/1 on the device, the optimizer's
    found_inf) and the first such step (0-based, ``first``), kept without reading them."""

    def __init__(self, device: str):
        self.failed = torch.zeros((), dtype=torch.float32, device=device)
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def record(self, bad: torch.Tensor, step: int) -> None:
        """Fold in step ``step``'s verdict (a 0-dim bool tensor): device ops only."""
        newly = bad & (self.failed == 0)
        self.first = torch.where(newly, torch.full_like(self.first, step), self.first)
        self.failed = torch.maximum(self.failed, bad.to(self.failed.dtype))


@dataclass
class Trainer:
    """The state of one run (policy, optimizer, schedule, data, which rank) and its step."""

    cfg: Config
    policy: torch.nn.Module
    """The causal LM (a peft model with LoRA); under FSDP2 its parameters are shards."""
    engine: torch.nn.Module
    """What runs the forward: logprobs.ResponseLogps(policy), under DDP or FSDP2 when distributed."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    splits: dict[str, Split]
    device: str
    total_steps: int
    reference: Callable = cached_reference
    """reference(split, index) -> (ref_chosen, ref_rejected); the benchmark swaps in a live model."""
    autocast: Callable = contextlib.nullcontext
    world: World = field(default_factory=World)
    compiled: bool = False
    """Whether the decoder layers are compiled (train.torch_compile, compiling.py)."""
    token_budget: int | None = None
    """train.micro_batch_tokens resolved (auto: batches.auto_token_budget); None: fixed micro-batches."""
    shared: bool = field(init=False)
    micro: int = field(init=False)
    guard: StepGuard = field(init=False)
    """The non-finite guard (see the module docstring): read with the metrics, never per step."""

    def __post_init__(self):
        self.shared = supports_shared_prefix(self.policy)
        self.micro = self.cfg.train.per_device_train_batch_size
        self.batch = paths.effective_batch_size(self.cfg.train, self.world.size)
        self.pad_multiple = compiling.pad_multiple(self.cfg, self.compiled)
        self.guard = StepGuard(next(self.policy.parameters()).device)

    def token_logps(self, split: Split, index: list[int], log_sum_sq: bool = False) -> PairTokens:
        """The policy's per-token log-probs of the pairs ``index``, in one forward pass
        (padding-free rows unless train.padding_free is off)."""
        with self.autocast():
            return pair_token_logps(self.engine, *self._pairs(split, index), self._options(log_sum_sq))

    def pair_logps(self, split: Split, index: list[int]):
        """(chosen [B], rejected [B]) sequence log-probs under the policy."""
        return self.token_logps(split, index).sums()

    def micro_loss(self, split: Split, index: list[int], scale: float):
        """(loss scaled by ``scale``, metric sums) of the pairs ``index`` in one forward pass: their
        objective (loss.pair_objective) computed by the logprobs layer, inside the LM head with
        train.fused_lm_head (logprobs.pair_loss)."""
        objective = pair_objective(self.cfg, split, index, scale, self.reference)
        with self.autocast():
            return pair_loss(self.engine, *self._pairs(split, index), self._options(self.cfg.train.use_weighting),
                             objective)

    def _pairs(self, split: Split, index: list[int]) -> tuple[list, list, list]:
        """The prompts, chosen and rejected token ids of the pairs ``index``."""
        return [split.prompts[i] for i in index], [split.chosens[i] for i in index], [split.rejecteds[i] for i in index]

    def _options(self, log_sum_sq: bool) -> PairOptions:
        """How the policy runs a batch of pairs (train.padding_free, fused_lm_head, the row padding)."""
        packing = None if self.cfg.train.padding_free else "none"
        return PairOptions(self.shared, self.device, packing, log_sum_sq, self.cfg.train.fused_lm_head,
                           self.pad_multiple)

    def micro_batch(self, index: list[int], accumulation_step: int, rank: int | None = None) -> list[int]:
        """A rank's pairs (this rank's by default) of one micro-batch of the global batch ``index``:
        micro-batch a of rank r is the (a x world + r)-th run of per_device_train_batch_size pairs."""
        rank = self.world.rank if rank is None else rank
        start = (accumulation_step * self.world.size + rank) * self.micro
        return index[start : start + self.micro]

    def micro_batches(self, index: list[int]) -> list[list[int]]:
        """This rank's micro-batches of the global batch ``index``: gradient_accumulation_steps of
        per_device_train_batch_size pairs, or with train.micro_batch_tokens the same pairs regrouped
        by tokens (batches.token_micro_batches), as many on every rank; with auto, only the steps
        where a fixed micro-batch of some rank exceeds the budget."""
        accumulation = self.cfg.train.gradient_accumulation_steps
        budget = self.token_budget
        fixed = [self.micro_batch(index, a) for a in range(accumulation)]
        if budget is None:
            return fixed
        split = self.splits["train"]
        size = lambda i: len(split.prompts[i]) + len(split.chosens[i]) + len(split.rejecteds[i])  # noqa: E731
        if self.cfg.train.micro_batch_tokens == "auto" and all(  # auto caps: a step that fits keeps its pairs
                sum(map(size, self.micro_batch(index, a, r))) <= budget
                for r in range(self.world.size) for a in range(accumulation)):
            return fixed

        def pairs_and_tokens(rank: int):
            pairs = [i for a in range(accumulation) for i in self.micro_batch(index, a, rank)]
            return pairs, [size(i) for i in pairs]

        count = max(len(token_micro_batches(pairs_and_tokens(r)[1], budget)) for r in range(self.world.size))
        pairs, tokens = pairs_and_tokens(self.world.rank)
        return [[pairs[k] for k in group] for group in token_micro_batches(tokens, budget, count)]

    def train_step(self, step: int) -> dict:
        """One optimizer step (0-based ``step``) on its batch; returns the step's metrics record, its
        sums and gradient norm 0-dim tensors on the device (``read_records`` reads them).

        A non-finite loss or gradient norm leaves the weights untouched (see the module docstring).
        """
        train_cfg, split = self.cfg.train, self.splits["train"]
        started = time.perf_counter()
        index = batch_indices(step, self.batch, len(split), train_cfg.seed)  # the global batch
        totals: dict = {}
        # Sum of per-pair losses x world size / effective batch: the micro-batch gradients add up, and
        # DDP / FSDP2 average them over the ranks, to the gradient of the mean loss over the batch,
        # however the pairs are grouped into micro-batches.
        scale = self.world.size / self.batch
        groups = self.micro_batches(index)
        for k, micro_index in enumerate(groups):
            with distributed.accumulating(self.engine, sync=k == len(groups) - 1):
                loss, sums = self.micro_loss(split, micro_index, scale)
                loss.backward()
            add_sums(totals, sums)  # on the device: no host sync per micro-batch
        totals = self.world.sum(totals)
        clip = train_cfg.max_grad_norm if train_cfg.max_grad_norm > 0 else float("inf")
        norm = distributed.clip_grad_norm(self.engine.parameters(), clip)
        self.guard.record(~(torch.isfinite(totals["loss"]) & torch.isfinite(norm)), step)
        lr = self.scheduler.get_last_lr()[0]
        precision.guarded_step(self.optimizer, self.guard.failed)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        precision.release_memory(self.device)  # RSS flat across steps on CPU
        return {"step": step + 1, "epoch": (step + 1) * self.batch / len(split),
                **{k: v / self.batch for k, v in totals.items()}, "grad_norm": norm, "learning_rate": lr,
                "tokens": token_count(split, index), "seconds": time.perf_counter() - started}

    def read_records(self, records: list[dict], seconds: float | None = None) -> list[dict]:
        """``records`` (from train_step) with their tensors read as floats, in one transfer, with
        ``seconds`` (the wall time they took together, read included; None: each step's own time)
        spread evenly and tokens/s. Raises TrainError when a step was non-finite (StepGuard): with
        no records, the guard's check alone (no eval of a run that has stopped)."""
        guard = self.guard
        keys = [(n, key) for n, record in enumerate(records) for key, value in record.items()
                if isinstance(value, torch.Tensor)]
        values = [records[n][key].detach().to(guard.failed.device, torch.float64).reshape(()) for n, key in keys]
        read = torch.stack([guard.failed.double(), guard.first.double(), *values]).tolist()
        failed, first, read = read[0], int(read[1]), read[2:]
        out = [dict(record) for record in records]
        for (n, key), value in zip(keys, read):
            out[n][key] = value
        if failed:
            self.optimizer.zero_grad(set_to_none=True)
            raise self._non_finite(first, next((r for r in out if r["step"] == first + 1), None))
        share = None if seconds is None else seconds / max(len(out), 1)
        for record in out:
            record["seconds"] = record["seconds"] if share is None else share
            record["tokens/s"] = record.pop("tokens") / record["seconds"]
        return out

    def run_step(self, step: int) -> dict:
        """``train_step`` then ``read_records`` of its record alone (one sync: what a benchmark that
        times each step, or a test, wants)."""
        started = time.perf_counter()
        record = self.train_step(step)
        return self.read_records([record], time.perf_counter() - started)[0]

    def _non_finite(self, step: int, record: dict | None) -> TrainError:
        split = self.splits["train"]
        index = batch_indices(step, self.batch, len(split), self.cfg.train.seed)
        ids = ", ".join(split.ids[i] for i in index[:8])
        what = "gradient norm" if record is not None and math.isfinite(record["loss"]) else "loss"
        return TrainError(
            f"non-finite {what} at step {step + 1} (batch ids {ids}{'...' if len(index) > 8 else ''}); the weights "
            "were not updated. Lower train.learning_rate or train.beta, check those examples, then --resume from the "
            "last checkpoint"
        )

def build_trainer(cfg: Config, splits: dict[str, Split], policy, world: World = World()) -> Trainer:
    """The engine (DDP / FSDP2 when distributed), then the optimizer (AdamW) and schedule
    (schedule.py), for train.precision (precision.py)."""
    train_cfg = cfg.train
    total = total_steps(train_cfg, len(splits["train"]), paths.effective_batch_size(train_cfg, world.size))
    device = next(policy.parameters()).device.type
    mode = precision.resolve(cfg)
    budget = token_budget(cfg, policy, world)  # before FSDP2 shards the weights
    compiled = compiling.enabled(cfg, device)
    if compiled:  # before DDP / FSDP2 wrap the layers, as torchtitan
        compiling.compile_layers(policy, train_cfg.torch_compile_mode)
    engine = distributed.wrap(policy, world, train_cfg.distributed, mode)
    trained = [p for p in engine.parameters() if p.requires_grad]  # all, or LoRA's adapters (shards under FSDP2)
    optimizer = precision.make_optimizer(mode, trained, train_cfg.learning_rate, train_cfg.weight_decay)
    scheduler = lr_scheduler(optimizer, train_cfg, total)
    autocast = precision.autocast(mode, device) if distributed.uses_autocast(world, train_cfg.distributed) \
        else contextlib.nullcontext
    reference = cached_reference if train_cfg.ld_alpha is None or not train_cfg.needs_reference() else \
        functools.partial(ld_reference, alpha=train_cfg.ld_alpha)
    return Trainer(cfg, policy, engine, optimizer, scheduler, splits, device, total, reference=reference,
                   autocast=autocast, world=world, compiled=compiled, token_budget=budget)


def token_budget(cfg: Config, policy, world: World) -> int | None:
    """train.micro_batch_tokens, with auto resolved from the model (batches.auto_token_budget)
    and said once."""
    budget = cfg.train.micro_batch_tokens
    if budget != "auto":
        return budget
    budget = auto_token_budget(policy, cfg.train.gradient_checkpointing)
    if world.main:
        log.info("train: micro_batch_tokens auto -> %s", f"{budget} (the tokens whose activations weigh about "
                 "the weights)" if budget else "fixed micro-batches (the model's config lacks its layer sizes)")
    return budget
