"""The Prefect flow `dpo-sweep`: score once, train many. One train task run per point.

    from flows.sweep_flow import dpo_sweep
    dpo_sweep(config=cfg.to_dict(), grid={"train.beta": [0.05, 0.1]})   # or config's sweep: section

Every point is checked before any task runs (flows/sweep_plan.py). Then prepare, score and audit
run once per dataset and reference cache the points use (skipped when up to date, as in the
dpo-pipeline flow), and each point trains in its own task run, named after the point, with its
overrides as parameters: a normal `dpo train --resume` of the point's config in a child process
(killed with the flow: a SIGKILLed sweep leaves no training behind). Points that need no
reference (reference-free losses) start before the cache is scored. At most sweep.max_parallel
train at once (Prefect's ThreadPoolTaskRunner), each pinned to its own GPUs where there are
GPUs. A finished point is Skipped on a rerun, an unfinished one resumes from its last
checkpoint; a failed point fails its task run only, and the flow ends Failed naming it, after
writing sweeps/<name>/report.html and the `dpo-sweep` table artifact.
"""

# No `from __future__ import annotations`: Prefect builds the parameter model from annotations.
import os
import queue
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.config.load import config_from_dict
from pipeline.config.schema import world_size
from pipeline.errors import ConfigError, SweepFailed
from pipeline.reports.sweep_report import sweep_rows, write_sweep_report
from pipeline.train.launch import DIE_WITH_PARENT, run_streaming

from flows.dpo_flow import child_failure, run_stage
from flows.params import PipelineConfig, config_dict
from flows.plan import plan, stage_complete
from flows.sweep_plan import (
    SweepPlan,
    SweepPoint,
    plan_sweep,
    read_point,
    record_point,
    report_points,
    write_sweep_json,
)


class DeviceSlots:
    """The device sets of one running sweep (CUDA_VISIBLE_DEVICES values; None on a CPU), one per
    point trained at once. A point takes a free one for its training and gives it back after, so
    never more points train than there are slots, and no two on the same GPUs.

        slots = DeviceSlots(device_slots(sweep))
        with slots.taken() as devices: ...       # waits for a free one
    """

    def __init__(self, slots: list[Optional[str]]):
        self.count = len(slots)
        self._free: queue.Queue = queue.Queue()
        for slot in slots:
            self._free.put(slot)

    @contextmanager
    def taken(self) -> Iterator[Optional[str]]:
        devices = self._free.get()
        try:
            yield devices
        finally:
            self._free.put(devices)


def device_slots(sweep: SweepPlan) -> list[Optional[str]]:
    """One entry per point trained at once: the GPUs it is pinned to (None: a CPU)."""
    import torch

    per_point = max(world_size(p.config.train) for p in sweep.points)
    cuda = torch.cuda.is_available() and any(p.config.train.device != "cpu" for p in sweep.points)
    if not cuda:
        return [None] * (sweep.max_parallel or 1)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    parallel = sweep.max_parallel or max(1, len(ids) // per_point)
    if parallel * per_point > len(ids):
        raise ConfigError(f"sweep.max_parallel={parallel} x {per_point} GPU(s) per point needs "
                          f"{parallel * per_point} GPUs, {len(ids)} are visible", hint="lower sweep.max_parallel "
                          "(or leave it null: one point per GPU)")
    return [",".join(ids[i * per_point:(i + 1) * per_point]) for i in range(parallel)]


def child_env(devices: Optional[str], parallel: int) -> dict:
    env = {**os.environ, DIE_WITH_PARENT: str(os.getpid()), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    elif parallel > 1 and "OMP_NUM_THREADS" not in os.environ:  # CPU points share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def train_point_child(point: str, config: dict, devices: Optional[str], parallel: int) -> None:
    """`dpo train --resume` of the point's config in a child process, its lines into the run's log."""
    logger = get_run_logger()
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "flows.cli", "train", "-c", str(config_path), "--resume", "--no-progress"]
        returncode, tail = run_streaming(command, lambda line: logger.info("%s | %s", point, line),
                                         env=child_env(devices, parallel))
    if returncode != 0:
        raise child_failure(f"train {point}", returncode, tail)


@task(name="train-point", cache_policy=NO_CACHE, task_run_name="train {point}")
def train_point(point: str, overrides: dict[str, Any], config: dict, sweep_dir: str, slots: DeviceSlots) -> dict:
    """Train one point of a sweep (a normal run, train.run_name = point); Skipped when finished."""
    cfg = config_from_dict(config)
    run_dir = plan(cfg)["train"]
    if stage_complete(cfg, "train", run_dir):
        record_point(sweep_dir, point, "finished")
        get_run_logger().info("%s: up to date, reusing %s", point, run_dir)
        return Completed(name="Skipped", message=f"up to date: reused {run_dir}",
                         data={"output_dir": str(run_dir), "skipped": True})
    with slots.taken() as devices:
        started, before = time.monotonic(), read_point(sweep_dir, point).get("wall_s") or 0.0
        record_point(sweep_dir, point, "running", devices=devices)
        try:
            train_point_child(point, config, devices, slots.count)
        except BaseException as exc:
            record_point(sweep_dir, point, "failed", error=str(exc)[-2000:],
                         wall_s=before + time.monotonic() - started)
            raise
    record_point(sweep_dir, point, "finished", error=None, wall_s=before + time.monotonic() - started)
    return {"output_dir": str(run_dir), "skipped": False}


def _shared_stages(points: list[SweepPoint]) -> None:
    """prepare once per dataset the points use (in order)."""
    done: set[Path] = set()
    for point in points:
        directory = point.planned["prepare"]
        if directory not in done:
            run_stage(point.config, "prepare", directory)
            done.add(directory)


def _by_cache(points: list[SweepPoint]) -> dict[Path, list[SweepPoint]]:
    caches: dict[Path, list[SweepPoint]] = {}
    for point in points:
        caches.setdefault(point.planned["audit"], []).append(point)
    return caches


def _submit(runner, sweep: SweepPlan, point: SweepPoint, slots: DeviceSlots):
    params = {"point": point.name, "overrides": point.overrides, "config": point.config.to_dict(),
              "sweep_dir": str(sweep.directory), "slots": slots}
    return runner.submit(train_point, params)


def _train_points(sweep: SweepPlan, slots: DeviceSlots) -> dict[str, Any]:
    """Submit every point (reference-free ones first, the others once their cache is scored and
    audited) and wait for them; returns {point: final state, or the error of its cache}."""
    futures, outcomes = {}, {}
    with ThreadPoolTaskRunner(max_workers=slots.count) as runner:
        for point in sweep.points:
            if not point.needs_reference():
                futures[point.name] = _submit(runner, sweep, point, slots)
        for cache, points in _by_cache([p for p in sweep.points if p.needs_reference()]).items():
            try:
                run_stage(points[0].config, "score", points[0].planned["score"])
                run_stage(points[0].config, "audit", cache)
            except Exception as exc:  # these points cannot train; the others go on
                for point in points:
                    outcomes[point.name] = f"not started: its reference cache {cache} failed: {exc}"
                    record_point(str(sweep.directory), point.name, "failed", error=outcomes[point.name])
                continue
            for point in points:
                futures[point.name] = _submit(runner, sweep, point, slots)
        for name, future in futures.items():
            future.wait()
            outcomes[name] = future.state
    return outcomes


def _failures(outcomes: dict[str, Any]) -> dict[str, str]:
    failed = {}
    for name, outcome in outcomes.items():
        if isinstance(outcome, str):
            failed[name] = outcome
        elif not outcome.is_completed():
            error = outcome.result(raise_on_failure=False)
            text = str(error) if isinstance(error, BaseException) else outcome.message or outcome.name
            failed[name] = text.splitlines()[0][:300]
    return failed


@flow(name="dpo-sweep", log_prints=True)
def dpo_sweep(config: PipelineConfig, grid: Optional[dict[str, list[Any]]] = None,
              name: Optional[str] = None) -> dict:
    """Score once, train many: one training run per point of the config's sweep (and ``grid``).

    config: the sweep's base configuration, with its `sweep:` section (the sections of a dpo YAML file).
    grid: dotted keys and the values to try, added to (or replacing) sweep.grid's.
    name: the sweep's name when sweep.name is unset (`dpo sweep`: the config file's name).
    """
    cfg = config_from_dict(config_dict(config))
    sweep = plan_sweep(cfg, grid, name)  # every point checked before any work
    slots = DeviceSlots(device_slots(sweep))
    write_sweep_json(sweep)
    logger = get_run_logger()
    logger.info("sweep %s: %d points, %d at a time, in %s", sweep.name, len(sweep.points), slots.count,
                sweep.directory)
    _shared_stages(sweep.points)
    outcomes = _train_points(sweep, slots)
    points = report_points(sweep)
    report = write_sweep_report(sweep.directory, sweep.name, points, sweep.metric)
    rows = sweep_rows(points, sweep.metric)
    create_table_artifact(rows, key="dpo-sweep", description=f"sweep {sweep.name}, sorted by {sweep.metric}: {report}")
    failed = _failures(outcomes)
    result = {"sweep": sweep.name, "report": str(report), "rows": rows, "failed": failed}
    if failed:
        raise SweepFailed(f"sweep {sweep.name}: {len(failed)} of {len(sweep.points)} points failed: "
                          + "; ".join(f"{n} ({why})" for n, why in failed.items()) + f". Report: {report}; "
                          "run the sweep again to retry them (finished points are skipped)")
    return result
