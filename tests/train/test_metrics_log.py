"""A run's cadences, end to end on the demo: the metrics log writes a train record every
train.logging_steps steps, at the last step and before each checkpoint (pipeline/train/metrics_log.py);
the evaluator at step 0, every train.eval_steps and at the end; the checkpointer every
train.save_steps, the last train.save_total_limit kept."""

from __future__ import annotations

from pipeline.storage import metrics
from pipeline.train.checkpoint import list_checkpoints
from pipeline.train.stage import train


def test_a_run_logs_evaluates_and_saves_when_its_parts_say(prepared_demo):
    cfg = prepared_demo({"max_steps": 12, "per_device_train_batch_size": 8, "logging_steps": 5, "eval_steps": 5,
                         "save_steps": 4, "save_total_limit": 2, "run_name": "cadence"})
    result = train(cfg, show_progress=False)
    records = metrics.read(metrics.path_of(result.run_dir))
    train_steps = [r["step"] for r in records if "loss" in r]
    eval_steps = [r["step"] for r in records if "eval/loss" in r]
    assert train_steps == [4, 5, 8, 10, 12]  # every 5, the last, and the steps a checkpoint follows
    assert eval_steps == [0, 5, 10, 12]
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["step-000004", "step-000008"]
    assert all(r["loss"] > 0 and 0 <= r["rewards/accuracies"] <= 1 for r in records if "loss" in r)
