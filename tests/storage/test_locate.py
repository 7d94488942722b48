"""Finding each stage's output for a config (pipeline/storage/locate.py): the computed folder is the
one the stage writes and the verified one found later, and a run's folder has one route, which the
train stage, the flows' plan (`dpo status`, sweeps) and the run itself agree on."""

from __future__ import annotations

import pytest

from pipeline.errors import CacheError
from pipeline.storage import locate, trust
from pipeline.train.stage import train

from flows.plan import plan, planned_run


def test_computed_found_and_written_folders_are_one(prepared_demo):
    cfg = prepared_demo({"max_steps": 1, "per_device_train_batch_size": 8, "eval_steps": 0, "save_steps": 0})
    dataset = locate.dataset_dir_for(cfg)
    assert locate.find_dataset(cfg) == dataset and trust.verified_dataset(dataset)["fingerprint"] == dataset.name
    cache = locate.refscores_dir_for(cfg, dataset.name)
    assert locate.find_refscores(cfg, dataset.name) == cache
    run = locate.run_dir_for(cfg, dataset.name, cache)
    planned, fingerprint = planned_run(cfg)
    assert planned == plan(cfg) and planned["prepare"] == dataset and planned["score"] == cache
    assert planned["train"] == run.path and fingerprint == run.fingerprint
    result = train(cfg, show_progress=False)
    assert result.run_dir == run.path and trust.verified_run(run.path)["fingerprint"] == run.fingerprint


def test_nothing_prepared_says_what_to_run(make_config, demo_assets):
    cfg = make_config(demo_assets["data"])
    with pytest.raises(CacheError) as raised:
        locate.find_dataset(cfg)
    assert "run `dpo prepare" in str(raised.value) and "dpo prepare" in raised.value.hint
