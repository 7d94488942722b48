"""The learning-rate schedule: how many optimizer steps a run takes, and the learning rate at each,
as Hugging Face's schedulers give it (warmup from 0, then linear or cosine decay to 0, or constant).

    total = total_steps(cfg.train, len(splits["train"]), batch)   # train.max_steps, or the epochs
    scheduler = lr_scheduler(optimizer, cfg.train, total)        # scheduler.step() after each step
    factor = lr_factor(step, warmup_steps(cfg.train, total), total, cfg.train.lr_scheduler_type)
"""

from __future__ import annotations

import math

import torch


def total_steps(train_cfg, pairs: int, batch: int) -> int:
    """train.max_steps, else train.num_train_epochs over ``pairs`` train pairs in steps of ``batch``
    (the effective batch), rounded up."""
    return train_cfg.max_steps or math.ceil(train_cfg.num_train_epochs * (pairs / batch))


def warmup_steps(train_cfg, total: int) -> int:
    """train.warmup_steps, else train.warmup_ratio of the total, rounded up (as Hugging Face)."""
    return train_cfg.warmup_steps or math.ceil(train_cfg.warmup_ratio * total)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of train.learning_rate at optimizer step ``step`` (0-based), as Hugging Face's
    schedulers (transformers.get_scheduler): warmup step / warmup from 0, then linear or cosine
    decay to 0 at ``total``; "constant" has no warmup."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """train.lr_scheduler_type over ``total`` steps, as a scheduler of ``optimizer`` (a checkpoint
    saves its step; the factor is rebuilt from the config, never saved)."""
    warmup = warmup_steps(train_cfg, total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, train_cfg.lr_scheduler_type)
    )
