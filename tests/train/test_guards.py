"""Training stops on a non-finite loss, and resumes past a damaged checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.errors import TrainError
from pipeline.models.assets import demo_preferences
from pipeline.prepare.stage import prepare
from pipeline.score.stage import score
from pipeline.storage import paths
from pipeline.train.stage import train

from tests.conftest import write_jsonl

TRAIN = {"learning_rate": 3e-3, "per_device_train_batch_size": 4, "max_steps": 6, "save_steps": 2, "save_total_limit": 3,
         "eval_steps": 0, "warmup_steps": 0}


@pytest.fixture
def small(tmp_path, make_config):
    data = write_jsonl(tmp_path / "d.jsonl", demo_preferences(40))

    def make(**train):
        cfg = make_config(data, tokenize={"max_length": 128, "max_prompt_length": 64},
                          train={**TRAIN, **train})
        prepare(cfg, show_progress=False)
        score(cfg, show_progress=False)
        return cfg

    return make


def test_non_finite_loss_stops_with_step_and_ids(small, monkeypatch):
    import pipeline.train.stage as train_module

    cfg = small(run_name="nan", step0_check="off")
    real = train_module.load_split_data

    def with_a_nan(dataset_dir, cache_dir, **options):
        splits, cache = real(dataset_dir, cache_dir, **options)
        splits["train"].ref_chosen[:] = float("nan")
        return splits, cache

    monkeypatch.setattr(train_module, "load_split_data", with_a_nan)
    with pytest.raises(TrainError, match=r"non-finite loss at step 1 \(batch ids [0-9a-f]{16}") as error:
        train(cfg, show_progress=False)
    assert "--resume" in str(error.value)
    run_dir = Path(cfg.storage) / "runs" / "nan"
    assert not (run_dir / "final").exists() and not (run_dir / "run.json").exists()


def _unfinish(run_dir):
    """Make a finished run look killed after its last checkpoint."""
    import shutil

    shutil.rmtree(run_dir / "final")
    (run_dir / "run.json").unlink()


@pytest.mark.parametrize("damage", ["truncated weights", "bad state.json"])
def test_resume_falls_back_past_a_damaged_last_checkpoint(small, caplog, damage):
    cfg = small(run_name=f"r-{damage.split()[0]}")
    whole = train(cfg, show_progress=False)
    expected = (whole.run_dir / "final" / "model.safetensors").read_bytes()
    metrics_before = (whole.run_dir / paths.METRICS).read_text()
    _unfinish(whole.run_dir)
    last = whole.run_dir / "checkpoints" / "step-000004"
    if damage == "truncated weights":
        weights = last / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (last / "state.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="dpo.train"):
        resumed = train(cfg, resume=True, show_progress=False)
    assert any("step-000004 cannot be loaded" in r.message for r in caplog.records)
    # It went back to step 2 and redid steps 3-6: the same bytes as the uninterrupted run.
    assert (resumed.run_dir / "final" / "model.safetensors").read_bytes() == expected

    def without_timing(text):
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens/s", "seconds")}
                for line in text.splitlines()]

    assert without_timing((resumed.run_dir / paths.METRICS).read_text()) == without_timing(metrics_before)


def test_every_checkpoint_damaged_is_refused_with_the_fix(small):
    cfg = small(run_name="all-bad")
    run_dir = train(cfg, show_progress=False).run_dir
    _unfinish(run_dir)
    for state in run_dir.glob("checkpoints/step-*/state.json"):
        state.write_text("")
    with pytest.raises(TrainError, match="all are damaged.*delete the folder"):
        train(cfg, resume=True, show_progress=False)
