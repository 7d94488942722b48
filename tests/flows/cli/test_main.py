"""The `dpo` command line: stdout's last line is the output directory; errors say what to fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.storage import trust

from tests.conftest import standard_rows, write_jsonl

DPO = str(Path(sys.executable).parent / "dpo")


def run(*args, cwd=None):
    return subprocess.run([DPO, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_prepare_command(tmp_path, demo_assets):
    write_jsonl(tmp_path / "d.jsonl", standard_rows(10) + ["{broken"])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"storage: out\ndata:\n  path: d.jsonl\nmodel:\n  path: {demo_assets['model']}\n"
    )
    first = run("prepare", "-c", str(config), "--set", "tokenize.max_length=256", "--set", "tokenize.max_prompt_length=128", "--no-progress")
    assert first.returncode == 0, first.stderr
    out_dir = Path(first.stdout.strip().splitlines()[-1])
    assert out_dir.parent == tmp_path / "out" / "datasets" and trust.verified_dataset(out_dir)["complete"]
    assert "11 rows read = 10 kept" in first.stderr and "malformed_json" in first.stderr
    again = run("prepare", "-c", str(config), "--set", "tokenize.max_length=256",
                "--set", "tokenize.max_prompt_length=128")
    assert again.stdout.strip().splitlines()[-1] == str(out_dir)
    assert "up to date" in again.stderr


def test_errors_exit_nonzero_with_a_fix(tmp_path, demo_assets):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  path: {tmp_path / 'missing.jsonl'}\nmodel:\n  path: {demo_assets['model']}\n")
    bad_key = run("prepare", "-c", str(config), "--set", "tokenize.max_lenght=5")
    assert bad_key.returncode == 2 and bad_key.stdout == ""
    assert "unknown key tokenize.max_lenght" in bad_key.stderr
    missing = run("prepare", "-c", str(config))
    assert missing.returncode == 1 and "set data.path" in missing.stderr


@pytest.mark.slow  # what `make demo` does in CI too
def test_demo_runs_offline_end_to_end(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([DPO, "demo", "--storage", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    assert run_dir == tmp_path / "runs" / "demo"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["final_eval"]["eval/rewards/accuracies"] > 0.75 > run["first_eval"]["eval/rewards/accuracies"]
    assert "reward accuracy" in done.stderr
    assert len(list((tmp_path / "datasets").iterdir())) == 1 and len(list((tmp_path / "refscores").iterdir())) == 1


def test_score_command(tmp_path, demo_assets):
    write_jsonl(tmp_path / "d.jsonl", standard_rows(6))
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  path: d.jsonl\nmodel:\n  path: {demo_assets['model']}\nstorage: out\n")
    missing = run("score", "-c", str(config))
    assert missing.returncode == 1 and "run `dpo prepare" in missing.stderr
    assert run("prepare", "-c", str(config)).returncode == 0
    scored = run("score", "-c", str(config), "--set", "score.shard_rows=4")
    assert scored.returncode == 0, scored.stderr
    out_dir = Path(scored.stdout.strip().splitlines()[-1])
    assert out_dir.parent == tmp_path / "out" / "refscores" and trust.verified_refscores(out_dir)["complete"]
    assert sorted(p.name for p in out_dir.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert "backend transformers" in scored.stderr
    bad = run("score", "-c", str(config), "--set", "score.backend=tpu")
    assert bad.returncode == 2 and "score.backend" in bad.stderr
