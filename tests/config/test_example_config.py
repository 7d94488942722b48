"""configs/: the README's example (HH-RLHF harmless-base + SmolLM2-135M-Instruct, by Hub id)
is a valid configuration and reads the real data and model from a local Hub cache, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.load import load_config
from pipeline.config.schema import is_hub_id

from tests.conftest import HH_TEST, hub_cache, requires_hh

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "smollm2-anthropic-hh.yaml"
DPO = str(Path(sys.executable).parent / "dpo")
COMMIT = "1" * 40


def test_the_example_config_is_valid_and_names_hub_ids():
    cfg = load_config(EXAMPLE)
    assert is_hub_id(cfg.model.path) and cfg.model.path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.data.path == "Anthropic/hh-rlhf" and cfg.data.data_dir == "harmless-base"
    assert Path(cfg.storage) == ROOT / "storage"  # relative to the file: the project's storage/
    assert cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps == 32


@pytest.mark.slow
@requires_hh()
def test_the_example_prepares_hh_rlhf_and_smollm2_from_a_local_hub_cache(tmp_path):
    """`dpo prepare -c configs/smollm2-anthropic-hh.yaml` as the README says, HF_HUB_OFFLINE=1 with a
    Hub cache holding the real SmolLM2-135M-Instruct (converted from the GGUF) as
    HuggingFaceTB/SmolLM2-135M-Instruct and the real harmless-base test split as Anthropic/hh-rlhf."""
    from pipeline.models.assets import smollm2_folder

    hf_home = tmp_path / "hf"
    model = smollm2_folder()
    hub_cache(hf_home, "HuggingFaceTB/SmolLM2-135M-Instruct",
              {f.name: f.read_bytes() for f in model.iterdir() if f.is_file() and not f.name.startswith(".")}, COMMIT)
    hub_cache(hf_home, "Anthropic/hh-rlhf", {"harmless-base/test.jsonl.gz": HH_TEST.read_bytes()}, COMMIT, "datasets")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    storage = tmp_path / "storage"
    done = subprocess.run([DPO, "prepare", "-c", str(EXAMPLE), "--set", "data.split=test",
                           "--set", f"storage={storage}", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    (manifest_path,) = storage.glob("datasets/*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    counts = manifest["counts"]
    assert counts["rows_read"] == 2312 and counts["kept"] + counts["rejected"] == 2312
    assert counts["kept"] > 2200
    assert COMMIT in json.dumps(manifest)  # the resolved commits are recorded
