"""The trainer: the state of one run (policy, engine, optimizer, schedule, data, rank) and how it
splits a step's pairs into micro-batches and runs the policy on them; ``build_trainer`` makes one
from a config, the splits and a loaded policy (DDP / FSDP2, AdamW, schedule, torch.compile).

    trainer = build_trainer(cfg, splits, policy, world)
    record = train_step(trainer, step)                       # pipeline/train/step.py
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pipeline.models import compiling, precision
from pipeline.train import distributed
from pipeline.storage import layout, metrics
from pipeline.config.schema import Config
from pipeline.train.distributed import World
from pipeline.logprobs.response import (
    PairOptions,
    PairTokens,
    pair_loss,
    pair_token_logps,
    supports_shared_prefix,
)
from pipeline.reports.run_report import write_run_report
from pipeline.train.trackers import Trackers
from pipeline.train.batches import Split, lr_factor, token_micro_batches, warmup_steps
from pipeline.train.loss import (
    PolicyLogps,
    add_sums,
    cached_reference,
    compute_loss,
    ld_reference,
    ld_weights,
    read_sums,
    wpo_weights,
)


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
    """The state of one run: policy, optimizer, schedule, data, where to write, which rank."""

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
    trackers: Trackers = field(default_factory=lambda: Trackers([]))
    """train.report_to's trackers (rank 0 only); they see every record metrics.jsonl gets."""
    compiled: bool = False
    """Whether the decoder layers are compiled (train.torch_compile, compiling.py)."""
    shared: bool = field(init=False)
    micro: int = field(init=False)
    guard: StepGuard = field(init=False)
    """The non-finite guard (train_step.py): read with the metrics, never per step."""

    def __post_init__(self):
        self.shared = supports_shared_prefix(self.policy)
        self.micro = self.cfg.train.per_device_train_batch_size
        self.batch = layout.effective_batch_size(self.cfg.train, self.world.size)
        self.pad_multiple = compiling.pad_multiple(self.cfg, self.compiled)
        self.guard = StepGuard(next(self.policy.parameters()).device)

    def token_logps(self, split: Split, index: list[int], log_sum_sq: bool = False) -> PairTokens:
        """The policy's per-token log-probs of the pairs ``index``, in one forward pass
        (padding-free rows unless train.padding_free is off)."""
        picked = [split.prompts[i] for i in index], [split.chosens[i] for i in index], [split.rejecteds[i] for i in index]
        packing = None if self.cfg.train.padding_free else "none"
        options = PairOptions(self.shared, self.device, packing, log_sum_sq, self.cfg.train.fused_lm_head,
                              self.pad_multiple)
        with self.autocast():
            return pair_token_logps(self.engine, *picked, options)

    def pair_logps(self, split: Split, index: list[int]):
        """(chosen [B], rejected [B]) sequence log-probs under the policy."""
        return self.token_logps(split, index).sums()

    def loss_inputs(self, split: Split, index: list[int]) -> PolicyLogps:
        """chosen [B], rejected [B] float32 and pair weights [B] or None, for compute_loss (policy_logps)."""
        return self.policy_logps(self.token_logps(split, index, log_sum_sq=self.cfg.train.use_weighting))

    def policy_logps(self, tokens: PairTokens) -> PolicyLogps:
        """The sums of ``tokens``, LD-DPO-weighted when train.ld_alpha is set, and WPO's pair
        weights when train.use_weighting."""
        train_cfg = self.cfg.train
        weights = None if train_cfg.ld_alpha is None else ld_weights(tokens.lengths, train_cfg.ld_alpha)
        chosen, rejected = tokens.sums(weights)
        return PolicyLogps(chosen.float(), rejected.float(), wpo_weights(tokens) if train_cfg.use_weighting else None)

    def micro_loss(self, split: Split, index: list[int], scale: float):
        """(loss scaled by ``scale``, metric sums) of the pairs ``index`` in one forward pass; with
        train.fused_lm_head the loss is computed inside the LM head (logprobs.pair_loss)."""
        train_cfg = self.cfg.train

        def chunk_loss(pairs: range, values, lengths, squares):
            tokens = PairTokens(values, lengths, squares)
            return compute_loss(self.cfg, split, index[pairs.start : pairs.stop], self.policy_logps(tokens), scale,
                                self.reference)

        picked = [split.prompts[i] for i in index], [split.chosens[i] for i in index], [split.rejecteds[i] for i in index]
        packing = None if train_cfg.padding_free else "none"
        options = PairOptions(self.shared, self.device, packing, train_cfg.use_weighting, train_cfg.fused_lm_head,
                              self.pad_multiple)
        with self.autocast():
            return pair_loss(self.engine, *picked, options, chunk_loss)

    def micro_batch(self, index: list[int], accumulation_step: int, rank: int | None = None) -> list[int]:
        """A rank's pairs (this rank's by default) of one micro-batch of the global batch ``index``:
        micro-batch a of rank r is the (a x world + r)-th run of per_device_train_batch_size pairs."""
        rank = self.world.rank if rank is None else rank
        start = (accumulation_step * self.world.size + rank) * self.micro
        return index[start : start + self.micro]

    def micro_batches(self, index: list[int]) -> list[list[int]]:
        """This rank's micro-batches of the global batch ``index``: gradient_accumulation_steps of
        per_device_train_batch_size pairs, or with train.micro_batch_tokens the same pairs regrouped
        by tokens (train_data.token_micro_batches), as many on every rank."""
        accumulation = self.cfg.train.gradient_accumulation_steps
        budget = self.cfg.train.micro_batch_tokens
        fixed = [self.micro_batch(index, a) for a in range(accumulation)]
        if budget is None:
            return fixed
        split = self.splits["train"]

        def pairs_and_tokens(rank: int):
            pairs = [i for a in range(accumulation) for i in self.micro_batch(index, a, rank)]
            return pairs, [len(split.prompts[i]) + len(split.chosens[i]) + len(split.rejecteds[i]) for i in pairs]

        count = max(len(token_micro_batches(pairs_and_tokens(r)[1], budget)) for r in range(self.world.size))
        pairs, tokens = pairs_and_tokens(self.world.rank)
        return [[pairs[k] for k in group] for group in token_micro_batches(tokens, budget, count)]

    def evaluate(self, step: int) -> dict:
        """Eval-split metrics, each rank scoring every world-size-th pair (all ranks make the same
        number of forward passes, as FSDP2 needs; a rank with no pair left repeats pair 0 and
        discards it)."""
        split = self.splits["eval"]
        if not len(split):
            return {}
        self.engine.eval()
        totals: dict = {}
        share = list(range(self.world.rank, len(split), self.world.size))
        longest = math.ceil(len(split) / self.world.size)
        size = self.cfg.train.per_device_eval_batch_size
        with torch.no_grad():
            for start in range(0, longest, size):
                index = share[start : start + size]
                policy = self.loss_inputs(split, index or [0])
                if not index:
                    continue
                _, sums = compute_loss(self.cfg, split, index, policy, 1.0, self.reference)
                add_sums(totals, sums)  # on the device: read once, below
        self.engine.train()
        totals = read_sums(self.world.sum(totals))
        return {"step": step, **{f"eval/{k}": v / len(split) for k, v in totals.items()}}

    def log(self, path: Path, record: dict) -> None:
        """Append a metrics record (rank 0 writes; the others computed the same record)."""
        if self.world.main:
            metrics.append(path, record)
            self.trackers.log(record, record["step"])
            if "eval/loss" in record and record["step"] > 0:  # report.html: watchable during the run
                write_run_report(path.parent, metrics.read(path), self.cfg.to_dict())


def build_trainer(cfg: Config, splits: dict[str, Split], policy, world: World = World()) -> Trainer:
    """The engine (DDP / FSDP2 when distributed), then the optimizer (AdamW) and schedule, for
    train.precision (precision.py)."""
    train_cfg = cfg.train
    steps_per_epoch = len(splits["train"]) / layout.effective_batch_size(train_cfg, world.size)
    total_steps = train_cfg.max_steps or math.ceil(train_cfg.num_train_epochs * steps_per_epoch)
    warmup = warmup_steps(train_cfg, total_steps)
    device = next(policy.parameters()).device.type
    mode = precision.resolve(cfg)
    compiled = compiling.enabled(cfg, device)
    if compiled:  # before DDP / FSDP2 wrap the layers, as torchtitan
        compiling.compile_layers(policy, train_cfg.torch_compile_mode)
    engine = distributed.wrap(policy, world, train_cfg.distributed, mode)
    trained = [p for p in engine.parameters() if p.requires_grad]  # all, or LoRA's adapters (shards under FSDP2)
    optimizer = precision.make_optimizer(mode, trained, train_cfg.learning_rate, train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, train_cfg.lr_scheduler_type)
    )
    autocast = precision.autocast(mode, device) if distributed.uses_autocast(world, train_cfg.distributed) \
        else contextlib.nullcontext
    reference = cached_reference if train_cfg.ld_alpha is None or not train_cfg.needs_reference() else \
        functools.partial(ld_reference, alpha=train_cfg.ld_alpha)
    return Trainer(cfg, policy, engine, optimizer, scheduler, splits, device, total_steps, reference=reference,
                   autocast=autocast, world=world, compiled=compiled)
