"""The checkpointer's cadence (pipeline/train/checkpointer.py): every train.save_steps steps, never
at the end (final/ is the end), never with save_steps 0. A real run's checkpoints are checked in
tests/train/test_metrics_log.py, its resumes in tests/train/test_stage.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.train.checkpointer import Checkpointer


def trainer_with(save_steps: int, total_steps: int):
    return SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(save_steps=save_steps)), total_steps=total_steps)


@pytest.mark.parametrize("save_steps, total, due", [(4, 12, [4, 8]), (5, 12, [5, 10]), (1, 3, [1, 2]),
                                                    (0, 12, []), (20, 12, [])])
def test_saves_every_save_steps_but_not_at_the_end(save_steps, total, due, tmp_path):
    checkpointer = Checkpointer(trainer_with(save_steps, total), tmp_path, "fp", metrics_log=None)
    assert [done for done in range(1, total + 1) if checkpointer.due(done)] == due
