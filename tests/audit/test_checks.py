"""The audit: every kind of damage is detected with the right message; a clean cache passes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.audit.checks import audit, diff_caches
from pipeline.audit.tokens import example_tokens
from pipeline.score.stage import score
from pipeline.storage import paths
from pipeline.store import sha256_file

DPO = str(Path(sys.executable).parent / "dpo")


def failures(report) -> list[str]:
    return [f.message for f in report.findings if not f.ok]


def test_clean_cache_passes_with_zero_rescore_diff(scored):
    cfg, cache, _ = scored
    report = audit(cache, cfg, rescore_rows=6)
    assert report.passed, failures(report)
    assert report.rescore["token_max"] == 0.0 and report.rescore["seq_max"] == 0.0
    st = report.stats
    assert st["rows"] == 600 and st["nonfinite_values"] == 0
    rows = [r for shard in sorted(cache.glob("part-*.parquet")) for r in pq.read_table(shard).to_pylist()]
    prefers = sum(r["chosen_logp"] > r["rejected_logp"] for r in rows) / len(rows)
    assert st["reference_prefers_chosen"] == pytest.approx(prefers, abs=1e-12)
    assert st["max_token_sum_vs_sequence_diff"] < 1e-4
    assert len(st["lowest_token_logps"]) == 10
    lowest = st["lowest_token_logps"][0]["logp"]
    assert lowest == pytest.approx(st["token_logp"]["min"], abs=1e-6)
    # Another dtype drifts, but stays within the bfloat16 tolerance.
    half = audit(cache, cfg, rescore_rows=3, dtype="bfloat16")
    assert half.passed and 0 < half.rescore["token_max"] < 0.35


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "part-00001.parquet: sha256 differs|part-00001.parquet is not readable"),
        ("flip", "part-00001.parquet: sha256 differs"),
        ("extra", "foreign file notes.txt"),
        ("delete", "shard part-00002.parquet is missing"),
        ("temp", "temporary file .tmp-part-00000.parquet.x"),
    ],
)
def test_integrity_damage_is_detected(scored, damage, message):
    cfg, cache, config_file = scored
    if damage == "truncate":
        shard = cache / "part-00001.parquet"
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flip":
        shard = cache / "part-00001.parquet"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "extra":
        (cache / "notes.txt").write_text("hi")
    elif damage == "delete":
        (cache / "part-00002.parquet").unlink()
    elif damage == "temp":
        (cache / ".tmp-part-00000.parquet.x").write_bytes(b"")
    report = audit(cache, cfg)
    assert not report.passed
    assert any(__import__("re").search(message, m) for m in failures(report)), failures(report)
    done = subprocess.run([DPO, "audit", str(cache)], capture_output=True, text=True)
    assert done.returncode == 1 and "audit failed" in done.stderr


def test_nan_in_a_copy_is_detected(scored, tmp_path):
    cfg, cache, _ = scored
    copy = tmp_path / "storage" / "refscores" / ("f" * 64)
    shutil.copytree(cache, copy)
    shard = copy / "part-00000.parquet"
    table = pq.read_table(shard)
    values = table.column("chosen_logp").to_pylist()
    values[5] = float("nan")
    table = table.set_column(table.schema.get_field_index("chosen_logp"), "chosen_logp", [values])
    pq.write_table(table, shard)
    report = audit(copy, cfg)
    messages = failures(report)
    assert any("sha256 differs" in m for m in messages)
    assert not report.stats  # a shard whose hash differs is never read
    # Recorded in the manifest (as a broken scorer would have): the NaN itself is found.
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = sha256_file(shard, use_cache=False)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    messages = failures(audit(copy, cfg))
    assert any("NaN or infinite" in m for m in messages), messages


def test_staleness_is_detected(scored):
    cfg, cache, config_file = scored
    assert audit(cache, cfg).passed
    weights = Path(cfg.model.path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one changed bit in the weights
    weights.write_bytes(bytes(data))
    assert "model weights changed since scoring (model.safetensors)" in failures(audit(cache, cfg))
    tokenizer_config = Path(cfg.model.path) / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["model_max_length"] = 123
    tokenizer_config.write_text(json.dumps(settings))
    messages = failures(audit(cache, cfg))
    assert "tokenizer file tokenizer_config.json changed since the data was prepared" in messages
    done = subprocess.run([DPO, "audit", "-c", str(config_file), "--set", "tokenize.max_length=100"],
                          capture_output=True, text=True)
    # The cache is found through the config; max_length=100 names another dataset, so the
    # config's cache is looked up and not found, or found stale: either way a non-zero exit.
    assert done.returncode != 0


def test_diff_show_and_report(scored, tmp_path):
    cfg, cache, config_file = scored
    cfg.score.store_token_logps = False
    lean = score(cfg, show_progress=False).output_dir
    result = diff_caches(cache, lean)
    assert result["rows"] == 600 and result["chosen_seq_max"] < 1e-6
    assert result["chosen_token_counts_equal"]
    from transformers import AutoTokenizer

    example_id = pq.read_table(cache / "part-00000.parquet", columns=["id"]).column("id")[0].as_py()
    shown = example_tokens(cache, example_id, AutoTokenizer.from_pretrained(cfg.model.path))
    assert sum(t["logp"] for t in shown["chosen"]["tokens"]) == pytest.approx(shown["chosen"]["logp"], abs=1e-4)
    assert "".join(t["token"] for t in shown["chosen"]["tokens"]).endswith("<|im_end|>")
    done = subprocess.run([DPO, "audit", "show", example_id, "--cache", str(cache)], capture_output=True, text=True)
    assert done.returncode == 0 and "log pi_ref" in done.stderr
    done = subprocess.run([DPO, "audit", str(cache), "--json"], capture_output=True, text=True)
    assert done.returncode == 0
    assert json.loads(done.stdout.strip().splitlines()[-1])["passed"] is True
    html = paths.audit_report_path(cfg.storage, cache.name, "quick", ".html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "PASSED" in html
    # The report lives apart from the cache: the cache holds only its shards and manifest.
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json"] + [f"part-0000{i}.parquet" for i in range(3)]
    assert audit(cache, cfg).passed


@pytest.mark.slow
def test_html_report_renders_in_chromium(scored, tmp_path):
    from tests.conftest import assert_plots_render

    _, cache, _ = scored
    from pipeline.audit.report import save_report

    assert_plots_render(save_report(audit(cache)), tmp_path)
