"""pipeline.workers on a toy job (no model): shards run in this process with the caller's job
and progress, or on spawned worker processes each building one job; a worker's user error
reaches the caller as itself; a killed worker's unfinished shards run again, and a worker that
keeps dying stops the run with the stage's error. (The stages' own byte-identity tests:
tests/score/test_runners.py, tests/generate/test_stage.py.)"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

import pipeline.workers as workers_module
from pipeline.errors import GenerateError, ScoreError
from pipeline.workers import Workers, default_workers, run_shards


@dataclass
class ToyWork:
    """Shard k is the file k.txt holding k squared; ``die_on``: a shard whose worker is killed
    (once, or every time with ``always``); ``refuse``: a shard that raises a user error."""

    out_dir: str
    die_on: int | None = None
    always: bool = False
    refuse: int | None = None
    cpu_threads: int | None = 1
    gpu: bool = False

    def job(self) -> "ToyJob":
        return ToyJob(self)


class ToyJob:
    def __init__(self, work: ToyWork):
        self.work, self.pid = work, os.getpid()

    def run(self, index: int, progress=None):
        out = Path(self.work.out_dir)
        if index == self.work.refuse:
            raise GenerateError(f"shard {index} refused", hint="fix it")
        marker = out / f"died-{index}"
        if index == self.work.die_on and (self.work.always or not marker.exists()):
            marker.touch()
            os._exit(9)  # as a kill -9
        (out / f"{index}.txt").write_text(str(index * index))
        if progress is not None:
            progress(index)
        import torch

        stats = {"threads": torch.get_num_threads(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
        return {"file": f"{index}.txt"}, stats, {"pid": self.pid}


def test_one_local_worker_runs_here_with_the_callers_job_and_progress(tmp_path):
    work = ToyWork(str(tmp_path))
    job, seen = work.job(), []
    results = list(run_shards(work, [3, 1, 2], Workers("toy", GenerateError), job, seen.append))
    assert [r[0]["file"] for r in results] == ["3.txt", "1.txt", "2.txt"]  # in order
    assert {r[2]["pid"] for r in results} == {os.getpid()} and seen == [3, 1, 2]
    assert list(run_shards(work, [], Workers("toy", GenerateError, count=2))) == []


def test_two_local_workers_run_every_shard_once_on_other_processes(tmp_path):
    """GPU work where no GPU is visible: the workers run unpinned (on the CPU)."""
    import torch

    work = ToyWork(str(tmp_path), cpu_threads=1, gpu=True)
    results = list(run_shards(work, list(range(6)), Workers("toy", GenerateError, count=2)))
    assert sorted(r[0]["file"] for r in results) == [f"{k}.txt" for k in range(6)]
    assert os.getpid() not in {r[2]["pid"] for r in results}
    assert {r[1]["threads"] for r in results} == {1}  # the work's cpu_threads in every worker
    if not torch.cuda.is_available():
        assert {r[1]["gpus"] for r in results} == {os.environ.get("CUDA_VISIBLE_DEVICES")}
        assert default_workers("cuda", 2) == 1
    assert default_workers("cpu") == 1
    assert all((tmp_path / f"{k}.txt").read_text() == str(k * k) for k in range(6))


def test_a_workers_user_error_reaches_the_caller_as_itself(tmp_path):
    work = ToyWork(str(tmp_path), refuse=2)
    with pytest.raises(GenerateError, match="shard 2 refused"):
        list(run_shards(work, [0, 1, 2, 3], Workers("toy", GenerateError, count=2)))


def test_a_killed_workers_shards_run_again_on_a_fresh_pool(tmp_path, caplog):
    work = ToyWork(str(tmp_path), die_on=3)
    with caplog.at_level(logging.WARNING, logger="dpo.toy"):
        results = list(run_shards(work, list(range(6)), Workers("toy", GenerateError, count=2)))
    assert sorted(r[0]["file"] for r in results) == [f"{k}.txt" for k in range(6)]
    assert (tmp_path / "died-3").exists()
    assert "toy: a worker crashed; running its" in caplog.text


def test_a_worker_that_keeps_dying_stops_the_run_with_the_stages_error(tmp_path, monkeypatch):
    monkeypatch.setattr(workers_module, "RETRIES", 0)
    work = ToyWork(str(tmp_path), die_on=0, always=True)
    with pytest.raises(ScoreError) as info:
        list(run_shards(work, [0, 1], Workers("score", ScoreError, count=2)))
    assert str(info.value).startswith("score workers crashed 1 times (")
    assert "run `dpo score` again to resume, with fewer score.workers if memory is short" in str(info.value)
