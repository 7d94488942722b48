"""The evaluator's cadence (pipeline/train/evaluator.py): every train.eval_steps steps before the
end (the end and step 0 have their own evals), none with eval_steps 0. What an eval computes is
checked against a run's metrics in tests/train/test_metrics_log.py and tests/train/test_stage.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.train.evaluator import Evaluator


@pytest.mark.parametrize("eval_steps, total, due", [(5, 12, [5, 10]), (4, 12, [4, 8]), (0, 12, []), (50, 12, [])])
def test_evaluates_every_eval_steps_before_the_end(eval_steps, total, due):
    trainer = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(eval_steps=eval_steps)), total_steps=total)
    evaluator = Evaluator(trainer, metrics_log=None)
    assert [done for done in range(1, total + 1) if evaluator.due(done)] == due
