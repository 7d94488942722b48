"""Scoring at scale: shards on several workers (local processes, Ray) give the bytes one worker
gives, a killed worker's shards are redone, and only rows no other cache holds are scored."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.config.load import config_from_dict
from pipeline.prepare.stage import prepare
from pipeline.score.stage import score

from tests.conftest import varied_rows, write_jsonl

DPO = str(Path(sys.executable).parent / "dpo")


@pytest.fixture
def config(tmp_path, demo_assets):
    """config(data, storage folder, **score section) -> Config on the demo model."""

    def make(data: Path, storage: str, **score_cfg):
        return config_from_dict({
            "storage": str(tmp_path / storage),
            "data": {"path": str(data), "eval_fraction": 0.1},
            "model": {"path": str(demo_assets["model"])},
            "tokenize": {"max_length": 128, "max_prompt_length": 64},
            "score": {"shard_rows": 16, "backend": "transformers", **score_cfg},
        })

    return make


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def one_worker(tmp_path, config):
    """(data file, the cache one in-process worker writes)."""
    data = write_jsonl(tmp_path / "d.jsonl", varied_rows(120))
    cfg = config(data, "one")
    prepare(cfg, show_progress=False)
    return data, score(cfg, show_progress=False).output_dir


def test_two_local_workers_write_the_bytes_of_one(one_worker, config):
    data, expected = one_worker
    cfg = config(data, "two", workers=2)
    prepare(cfg, show_progress=False)
    result = score(cfg, show_progress=False)
    assert result.stats["workers"] == 2 and result.stats["rows_scored"] == 120
    assert result.output_dir.name == expected.name
    assert _files(result.output_dir) == _files(expected)  # every shard and the manifest


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow  # real processes and kill -9: ~1 min; CI runs it in make test-slow
def test_kill_9_of_a_worker_then_the_same_bytes(tmp_path, config):
    """kill -9 of one of two workers mid-run: its unfinished shards run again on a fresh pool
    and the cache ends byte-identical to one worker's; a kill -9 of the whole command and a
    restart too."""
    data = write_jsonl(tmp_path / "d.jsonl", varied_rows(120))
    reference = config(data, "one", shard_rows=4)
    prepare(reference, show_progress=False)
    expected = score(reference, show_progress=False).output_dir
    cfg = config(data, "killed", workers=2, shard_rows=4)
    prepare(cfg, show_progress=False)
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))
    out_dir = tmp_path / "killed" / "refscores" / expected.name
    for victim in ("worker", "command"):
        shutil.rmtree(out_dir, ignore_errors=True)
        proc = subprocess.Popen([DPO, "score", "-c", str(config_path), "--no-progress"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and len(list(out_dir.glob("part-*.parquet"))) < 3:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        if victim == "worker":
            workers = [p for p in _children(proc.pid) if "spawn_main" in " ".join(p.cmdline())]
            assert len(workers) == 2, [p.cmdline() for p in _children(proc.pid)]
            os.kill(workers[0].pid, signal.SIGKILL)
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            assert "a worker crashed; running its" in err
        else:
            children = _children(proc.pid)
            proc.kill()
            for child in children:
                child.kill()
            proc.communicate()
            rerun = subprocess.run([DPO, "score", "-c", str(config_path), "--no-progress"], capture_output=True,
                                   text=True)
            assert rerun.returncode == 0, rerun.stderr
            assert "resuming" in rerun.stderr
        assert _files(out_dir) == _files(expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path, monkeypatch):
    """A Ray head on 127.0.0.1 with 2 CPUs and its own auth token (Ray's token authentication,
    which this process's driver reads from RAY_AUTH_TOKEN); stopped by pid afterwards."""
    import secrets

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # before Ray is imported: it reads them once
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    pytest.importorskip("ray")
    port = _free_port()
    temp = Path(f"/tmp/ray-{os.getpid()}-{port}")  # short: Ray's socket paths are length-limited
    ray = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ)
    started = subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                              "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                              "--temp-dir", str(temp), "--disable-usage-stats"],
                             capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        ours = []  # the head's processes (their command lines name our temp dir) and their children
        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                if str(temp) in " ".join(process.info["cmdline"] or []):
                    ours += [process, *process.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for process in ours:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_cluster_writes_the_bytes_of_one_worker(one_worker, config, ray_cluster):
    data, expected = one_worker
    cfg = config(data, "ray", workers=2, runner="ray", ray_address=ray_cluster)
    prepare(cfg, show_progress=False)
    result = score(cfg, show_progress=False)
    assert result.stats["runner"] == "ray" and result.stats["rows_scored"] == 120
    assert _files(result.output_dir) == _files(expected)


def test_incremental_scores_only_new_rows_and_equals_a_full_rescore(tmp_path, config):
    """Dataset B = A minus 10% plus 20% new rows: scoring B after A scores only the new rows,
    copies the others from A's cache, and writes the bytes a full rescore of B writes (one
    pair per forward pass, score.tokens_per_batch 1: every row's numbers independent of its
    batch neighbours)."""
    rows = varied_rows(180)
    rng = random.Random(3)
    a = rows[:150]
    kept = [r for r in a if rng.random() > 0.1]
    new = rows[150:]
    b = kept + new
    rng.shuffle(b)
    data_a, data_b = write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)
    first = config(data_a, "inc", tokens_per_batch=1)
    prepare(first, show_progress=False)
    cache_a = score(first, show_progress=False).output_dir
    second = config(data_b, "inc", tokens_per_batch=1)
    prepare(second, show_progress=False)
    incremental = score(second, show_progress=False)
    fresh_cfg = config(data_b, "fresh", tokens_per_batch=1)
    prepare(fresh_cfg, show_progress=False)
    fresh = score(fresh_cfg, show_progress=False)
    # rows of B: len(kept) in A's cache, len(new) scored; prepare may reject none of these rows
    assert incremental.stats["rows_reused"] == len(kept)
    assert incremental.stats["rows_scored"] == len(new)
    manifest = json.loads((incremental.output_dir / "manifest.json").read_text())
    assert manifest["reused_from"] == {cache_a.name: len(kept)}
    from flows.cli.commands import summarize_score

    said = summarize_score(incremental)
    assert f"reused {len(kept)} rows already scored in other caches ({len(kept)} from {cache_a.name[:12]})" in said
    assert f"scored {len(new)} new" in said
    assert sum(sum(s.get("reused_from", {}).values()) for s in manifest["shards"]) == len(kept)
    shards = {n: d for n, d in _files(incremental.output_dir).items() if n != "manifest.json"}
    assert shards == {n: d for n, d in _files(fresh.output_dir).items() if n != "manifest.json"}
    reference = json.loads((fresh.output_dir / "manifest.json").read_text())
    manifest.pop("reused_from")
    for entry in manifest["shards"]:
        entry.pop("reused_from", None)
    assert manifest == reference
    # reuse off: everything scored
    off = config(data_b, "inc", tokens_per_batch=1, reuse=False)
    shutil.rmtree(incremental.output_dir)
    assert score(off, show_progress=False).stats["rows_reused"] == 0


def test_a_dead_workers_half_shard_is_not_left_in_the_cache(tmp_path, config, monkeypatch):
    """A worker killed while writing leaves a `.tmp-part-*` file; the coordinator, once every
    worker has stopped, removes it before the cache is complete (as a kill -9 can leave it)."""
    import pipeline.score.shards as shards_module
    from pipeline.storage.trust import verified_refscores

    data = write_jsonl(tmp_path / "d.jsonl", varied_rows(40))
    cfg = config(data, "dead")
    prepare(cfg, show_progress=False)
    real_run = shards_module.ShardJob.run

    def run_and_leave_a_half_shard(self, index, progress=None):
        (Path(self.work.out_dir) / f".tmp-part-{index:05d}.parquet.dead").write_bytes(b"PAR1 half")
        return real_run(self, index, progress)

    monkeypatch.setattr(shards_module.ShardJob, "run", run_and_leave_a_half_shard)
    result = score(cfg, show_progress=False)
    assert not list(result.output_dir.glob(".tmp-*"))
    verified_refscores(result.output_dir)  # every file accounted for


def _ray_actors(pid: int) -> list[psutil.Process]:
    """The Ray score workers (actors) under ``pid`` (a `dpo score` with its local Ray), by their
    process titles: ``ray::_ShardActor`` idle, ``ray::_ShardActor.run`` inside a shard."""
    actors = []
    for child in _children(pid):
        try:
            if child.cmdline() and child.cmdline()[0].startswith("ray::_ShardActor"):
                actors.append(child)
        except psutil.NoSuchProcess:
            pass
    return actors


def _kill_a_ray_worker_mid_shard(proc: subprocess.Popen, out_dir: Path) -> psutil.Process:
    """Once 3 shards are written, SIGKILL a Ray actor that is inside a shard."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(out_dir.glob("part-*.parquet"))) >= 3:
            busy = [a for a in _ray_actors(proc.pid) if a.cmdline()[0] == "ray::_ShardActor.run"]
            if busy:
                os.kill(busy[0].pid, signal.SIGKILL)
                assert len(list(out_dir.glob("part-*.parquet"))) < 30  # shards left to do
                return busy[0]
        time.sleep(0.05)
    raise AssertionError(proc.communicate() if proc.poll() is not None else "no busy Ray worker seen")


def _ray_score_setup(tmp_path, config, data: Path) -> tuple[Path, Path, Path]:
    """(the cache one in-process worker writes, config file of a local-Ray run on 2 workers, the
    folder its cache goes to). 30 shards of 4 rows."""
    pytest.importorskip("ray")
    reference = config(data, "one", shard_rows=4)
    prepare(reference, show_progress=False)
    expected = score(reference, show_progress=False).output_dir
    cfg = config(data, "ray", workers=2, shard_rows=4, runner="ray")
    prepare(cfg, show_progress=False)
    config_path = tmp_path / "ray.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))
    return expected, config_path, tmp_path / "ray" / "refscores" / expected.name


def _ray_env(**extra) -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **extra}


@pytest.mark.slow  # a local Ray and kill -9: ~1.5 min on 2 cores; CI runs it in make test-slow
def test_kill_9_of_a_ray_worker_mid_shard_then_the_same_bytes(tmp_path, config):
    """score.runner ray (a local Ray): a worker (actor) killed with SIGKILL inside a shard is
    restarted by Ray and its shard run again; the command succeeds and the cache (every shard
    and the manifest) has the bytes of one in-process worker's."""
    data = write_jsonl(tmp_path / "d.jsonl", varied_rows(120))
    expected, config_path, out_dir = _ray_score_setup(tmp_path, config, data)
    proc = subprocess.Popen([DPO, "score", "-c", str(config_path), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_ray_env())
    try:
        killed = _kill_a_ray_worker_mid_shard(proc, out_dir)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert not killed.is_running()
    assert "120 examples, 30 shards" in err and "2 ray workers" in err
    assert _files(out_dir) == _files(expected)  # every shard and the manifest


NO_RAY_RETRIES = """
import os
import sys
if os.environ.get("DPO_TEST_SCORE_RETRIES") and sys.argv and sys.argv[0].endswith("dpo"):
    import pipeline.workers

    pipeline.workers.RETRIES = int(os.environ["DPO_TEST_SCORE_RETRIES"])
"""


@pytest.mark.slow  # a local Ray twice and kill -9: ~2.5 min on 2 cores; CI runs it in make test-slow
def test_a_ray_worker_killed_past_its_restarts_is_a_clear_error_and_a_rerun_ends_the_same(tmp_path, config):
    """With no restarts left (RETRIES 0 here), a Ray worker killed inside a shard stops `dpo
    score` with a one-line error saying what happened and what to do; the rerun resumes from the
    shards written and ends with the bytes of one in-process worker's cache."""
    data = write_jsonl(tmp_path / "d.jsonl", varied_rows(120))
    expected, config_path, out_dir = _ray_score_setup(tmp_path, config, data)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_RAY_RETRIES)
    env = _ray_env(PYTHONPATH=f"{hook}:{':'.join(sys.path)}", DPO_TEST_SCORE_RETRIES="0")
    proc = subprocess.Popen([DPO, "score", "-c", str(config_path), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        _kill_a_ray_worker_mid_shard(proc, out_dir)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    message = err.split("error: ", 1)[1]
    assert message.startswith("a Ray score worker died and Ray may not restart it again (0 restarts per worker; "
                              "killed, or out of memory?)"), message
    assert message.rstrip().endswith("The shards written so far are kept: run `dpo score` again to resume, "
                                     "with fewer score.workers if memory is short"), message
    assert "Traceback" not in err
    written = len(list(out_dir.glob("part-*.parquet")))
    assert 3 <= written < 30
    rerun = subprocess.run([DPO, "score", "-c", str(config_path), "--no-progress"], capture_output=True, text=True,
                           env=_ray_env(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert _files(out_dir) == _files(expected)
