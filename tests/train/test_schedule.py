"""The learning-rate schedule (pipeline/train/schedule.py): the same rates as Hugging Face's
schedulers, step by step, and the step counts they run over."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.train.schedule import lr_factor, lr_scheduler, total_steps, warmup_steps


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (4, 10), (3, 7)])
def test_lr_schedule_matches_hugging_face(kind, warmup, total):
    """The same learning rate at every step as transformers' own schedulers (TRL uses them), both
    the factor alone and the scheduler a run steps."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    ours_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    train_cfg = SimpleNamespace(warmup_steps=warmup, warmup_ratio=0.0, lr_scheduler_type=kind)
    ours = lr_scheduler(ours_optimizer, train_cfg, total)
    for step in range(total):
        assert lr_factor(step, warmup, total, kind) == pytest.approx(theirs.get_last_lr()[0], abs=1e-12), step
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], abs=1e-12), step
        for opt, sched in ((optimizer, theirs), (ours_optimizer, ours)):
            opt.step()
            sched.step()


def test_total_and_warmup_steps():
    cfg = SimpleNamespace(max_steps=0, num_train_epochs=2.5, warmup_steps=0, warmup_ratio=0.1)
    assert total_steps(cfg, pairs=100, batch=16) == 16  # ceil(2.5 x 100 / 16) = ceil(15.6)
    assert total_steps(SimpleNamespace(max_steps=7, num_train_epochs=3.0), pairs=100, batch=16) == 7
    assert warmup_steps(cfg, 16) == 2  # ceil(0.1 x 16), as Hugging Face rounds
    assert warmup_steps(SimpleNamespace(warmup_steps=5, warmup_ratio=0.5), 16) == 5  # steps win over a ratio
