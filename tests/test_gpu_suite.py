"""bench/gpu_suite.py's dry run (CPU, tiny shape): every code path the GPU run takes, so it never rots."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_hh

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@requires_hh()
def test_gpu_suite_dry_run(tmp_path):
    from pipeline.errors import AssetError
    from pipeline.models.assets import smollm2_folder

    try:
        smollm2_folder(with_model=False)  # the tokenizer that gives the HH lengths
    except AssetError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "x.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {(r["kind"], r["variant"]): r for r in report["rows"] if r["shape"] in ("tiny", None)}
    assert report["matmul_flops_per_s"] > 0 and report["machine"]["torch"]

    ours = {variant: row for (kind, variant), row in rows.items() if kind == "ours"}
    assert set(ours) == {"eager fused", "eager unfused", "compiled fused", "compiled unfused"}
    ran = {variant: row for variant, row in ours.items() if row["status"] == "ok"}
    assert {"eager fused", "eager unfused"} <= set(ran), {v: r.get("error") for v, r in ours.items()}
    for variant, row in ran.items():
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, variant
        assert len(row["losses"]) == 3 and all(math.isfinite(x) and x > 0 for x in row["losses"]), variant
        assert 0 < row["mfu"] and row["peak_gb"] > 0 and row["recompiles"] >= 0, variant
    for variant in ("compiled fused", "compiled unfused"):  # skipped on CPU without --compile
        assert ours[variant]["status"] in ("ok", "skipped")
    # the fused LM head changes no value: the same first-step loss with it on and off
    assert abs(ran["eager fused"]["losses"][0] - ran["eager unfused"]["losses"][0]) <= 1e-4

    score = rows[("score", "score transformers")]
    assert score["status"] == "ok" and score["tokens_per_s"] > 0 and score["seconds"] > 0
    trl = rows[("trl", "trl")]
    assert trl["status"] in ("ok", "not importable"), trl
    if trl["status"] == "ok":
        assert trl["tokens_per_s"] > 0 and ran["eager fused"]["step_vs_trl"] > 0
    assert rows[("vllm", "score vllm")]["status"] in ("ok", "not importable")

    table = done.stdout
    assert "| shape | variant | status | tok/s | MFU |" in table
    assert "| tiny | eager fused | ok |" in table and "| tiny | eager unfused | ok |" in table
    assert "trl" in table and f"wrote {out}" in table


@pytest.mark.slow
@requires_hh()
def test_gpu_suite_quick_dry_run(tmp_path):
    """--quick: its rows in order of value, the JSON complete at the end (it is rewritten after each
    row, complete: false until then), the scoring rows first."""
    from pipeline.errors import AssetError
    from pipeline.models.assets import smollm2_folder

    try:
        smollm2_folder(with_model=False)
    except AssetError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "quick.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["complete"] is True
    assert [(r["kind"], r["variant"]) for r in report["rows"]] == [
        ("matmul", "matmul"), ("score", "score transformers"), ("vllm", "score vllm"), ("ours", "eager fused"),
        ("trl", "trl")] + ([("trl precompute", "trl precompute")] if any(r["kind"] == "trl precompute"
                                                                       for r in report["rows"]) else [])
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["score transformers"]["status"] == "ok" and rows["score transformers"]["tokens_per_s"] > 0
    assert rows["eager fused"]["status"] == "ok" and rows["eager fused"]["mfu"] > 0
    assert rows["score vllm"]["status"] in ("ok", "not importable")
    if rows["score vllm"]["status"] == "ok":  # vLLM's CPU build: the same weights, so close values
        assert rows["score vllm"]["max_abs_diff_per_token"] < 1e-3
    assert "| tiny | eager fused | ok |" in done.stdout and f"wrote {out}" in done.stdout
