"""model.path as a Hub id, resolved offline from a local Hugging Face cache.

These machines reach no Hub, so the test builds the cache's layout itself (as `hf download`
leaves it: blobs, snapshots/<commit>/ symlinks, refs/main) from the demo model, and runs the
real code path with HF_HUB_OFFLINE=1: huggingface_hub resolves the id to the snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import demo_model_files, demo_valid_jsonl, hub_cache

DPO = str(Path(sys.executable).parent / "dpo")
REPO = "test-org/tiny-dpo"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


DATASET = "test-org/prefs"
DATASET_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def offline_hub(tmp_path, demo_assets):
    """HF_HOME with the demo model as test-org/tiny-dpo and the demo's parseable rows as the
    dataset test-org/prefs (data/train.jsonl), and HF_HUB_OFFLINE=1."""
    hf_home = tmp_path / "hf"
    snapshot = hub_cache(hf_home, REPO, demo_model_files(demo_assets), COMMIT)
    hub_cache(hf_home, DATASET, {"data/train.jsonl": demo_valid_jsonl(demo_assets).encode()}, DATASET_COMMIT, "datasets")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return env, snapshot


def _run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([DPO, *command, "--no-progress"], capture_output=True, text=True, env=env)


def test_hub_model_and_dataset_end_to_end_offline(tmp_path, demo_assets, offline_hub):
    env, snapshot = offline_hub
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "storage": "storage",  # relative to the config; the Hub ids must stay ids
        "data": {"path": DATASET, "split": "train", "eval_fraction": 0.1},
        "model": {"path": REPO},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "eval_steps": 0, "save_steps": 0,
                  "learning_rate": 1e-3, "run_name": "hub"},
    }))
    outputs = {}
    for stage in ("prepare", "score", "train"):
        done = _run([stage, "-c", str(config)], env)
        assert done.returncode == 0, done.stderr
        outputs[stage] = Path(done.stdout.strip().splitlines()[-1])
    source = {"path": REPO, "hub_id": REPO, "revision": None, "commit": COMMIT}
    dataset = json.loads((outputs["prepare"] / "manifest.json").read_text())
    assert dataset["tokenizer_source"] == source
    assert dataset["source"]["path"] == DATASET
    assert dataset["source"]["hub"] == {"hub_id": DATASET, "name": None, "data_dir": None, "split": "train",
                                        "revision": None, "commit": DATASET_COMMIT}
    parseable = 0
    for line in demo_assets["data"].read_text().splitlines():
        try:
            json.loads(line)
            parseable += 1
        except ValueError:
            pass
    assert dataset["counts"]["rows_read"] == parseable  # every row of the Hub split, read through datasets
    scores = json.loads((outputs["score"] / "manifest.json").read_text())
    assert scores["model_source"] == source and scores["model_path"] == REPO
    # the same content as the local folder: the same fingerprint as scoring the folder itself
    from pipeline.config.schema import ModelConfig
    from pipeline.models.loading import model_fingerprint

    assert scores["inputs"]["model"] == model_fingerprint(ModelConfig(path=str(demo_assets["model"])))
    run = json.loads((outputs["train"] / "run.json").read_text())
    assert run["complete"] and run["steps"] == 2


def test_hub_id_missing_offline_says_how_to_get_it(tmp_path, demo_assets, offline_hub):
    env, _ = offline_hub
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"storage": str(tmp_path / "s"), "data": {"path": str(demo_assets["data"])},
                                      "model": {"path": "test-org/not-cached"}}))
    done = _run(["prepare", "-c", str(config)], env)
    assert done.returncode == 1
    assert "test-org/not-cached is not in the local Hugging Face cache" in done.stderr
    assert "HF_HUB_OFFLINE=1" in done.stderr and "hf download test-org/not-cached" in done.stderr
    config.write_text(yaml.safe_dump({"storage": str(tmp_path / "s"), "data": {"path": str(demo_assets["data"])},
                                      "model": {"path": str(demo_assets["model"]), "revision": "v1"}}))
    done = _run(["prepare", "-c", str(config)], env)
    assert "applies to a Hub id" in done.stderr
    config.write_text(yaml.safe_dump({"storage": str(tmp_path / "s"), "data": {"path": "test-org/no-such-data"},
                                      "model": {"path": REPO}}))
    done = _run(["prepare", "-c", str(config)], env)
    assert done.returncode == 1
    assert "the dataset test-org/no-such-data is not in the local Hugging Face cache" in done.stderr
    assert "hf download test-org/no-such-data --repo-type dataset" in done.stderr
    config.write_text(yaml.safe_dump({"storage": str(tmp_path / "s"), "model": {"path": REPO},
                                      "data": {"path": str(demo_assets["data"]), "data_dir": "x"}}))
    assert "data.data_dir applies to a Hub dataset id" in _run(["prepare", "-c", str(config)], env).stderr


def test_revision_pins_a_commit(tmp_path, demo_assets, offline_hub, monkeypatch):
    """model.revision picks the snapshot of that commit (offline: a commit hash in the cache)."""
    from huggingface_hub import constants

    from pipeline.config.schema import ModelConfig
    from pipeline.models.loading import hub_snapshot, model_source

    env, snapshot = offline_hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(env["HF_HOME"]) / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_snapshot.cache_clear()
    try:
        source = model_source(ModelConfig(path=REPO, revision=COMMIT))
        assert source["commit"] == COMMIT and source["revision"] == COMMIT
    finally:
        hub_snapshot.cache_clear()
