"""Where a stage's shard jobs run: in this process, in N local worker processes, or on a Ray cluster.

    where = Workers("score", ScoreError, runner="local", count=2)
    for entry, stats, settings in run_shards(work, missing, where):
        ...   # one result per shard, in completion order

``work`` is plain, picklable data and file paths, never tensors or tables: ``work.job()`` builds
the job that loads the model once and ``job.run(index, progress)`` writes shard ``index`` and
returns a ``Result``; ``work.cpu_threads`` (None, or the intra-op threads every worker computes
with) and ``work.gpu`` (whether the work runs on GPUs when some are visible) say how a worker is
set up. Each worker builds one job and takes shards until none is left. The coordinator (the
stage) is the only writer of its manifest, so the shards' completion order does not matter.

- ``local``: ``concurrent.futures.ProcessPoolExecutor`` (spawn), one process per worker, each
  pinned to its own GPUs (CUDA_VISIBLE_DEVICES, ``gpus_each`` each) before CUDA starts.
  A crashed worker (killed, out of memory) breaks the pool: the shards it had not finished are
  run again by a fresh pool (``RETRIES`` times); finished shards are kept.
- ``ray``: one Ray actor per worker (``num_gpus=gpus_each``: Ray places them), fed by
  ``ray.util.ActorPool``; a dead actor is restarted and its shard retried by Ray itself
  (``max_restarts`` / ``max_task_retries``), ``RETRIES`` times, then the run stops with the
  stage's error (the finished shards are kept). ``address`` None starts a local Ray on 127.0.0.1
  for the run and stops it after (never a cluster already running here); otherwise it joins
  that cluster, which needs this package importable on every node and the storage on a
  filesystem every node can write.

A user error raised in a worker (a ``DpoError``) reaches the coordinator as itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.errors import DpoError

RETRIES = 2
"""Times a crashed worker's unfinished shards are run again."""

Result = tuple[dict, dict, Any]
"""(manifest entry, stats, the settings of the worker that wrote the shard, or None)."""


def default_workers(device: str, gpus_per_worker: int = 1) -> int:
    """One worker per visible GPU (per gpus_per_worker of them), one on the CPU."""
    if device == "cpu":
        return 1
    import torch

    return max(1, torch.cuda.device_count() // gpus_per_worker) if torch.cuda.is_available() else 1


@dataclass
class Workers:
    """Where the shards of a ``stage`` (its config section, command and log name) run:
    ``runner`` (local | ray), ``count`` workers of ``gpus_each`` GPUs, and for Ray the cluster's
    ``address`` (None: a local Ray for the run). ``error``: the stage's error class."""

    stage: str
    error: type[DpoError] = DpoError
    runner: str = "local"
    count: int = 1
    gpus_each: int = 1
    address: str | None = None

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"dpo.{self.stage}")

    def failed(self, message: str) -> DpoError:
        """The stage's error for workers that died: what happened, then how to resume."""
        return self.error(message, hint=f"run `dpo {self.stage}` again to resume, with fewer "
                                        f"{self.stage}.workers if memory is short")


def run_shards(work, indices: list[int], workers: Workers, job=None, progress=None) -> Iterator[Result]:
    """Run the shards ``indices`` of ``work``; one local worker runs them in this process, with
    ``job`` (a loaded job of ``work``) when given and ``progress`` passed to each ``job.run``."""
    if not indices:
        return iter(())
    if workers.runner == "ray":
        return _run_ray(work, indices, workers)
    if workers.count <= 1:
        return _run_here(job or work.job(), indices, progress)
    return _run_pool(work, indices, workers)


def _run_here(job, indices: list[int], progress) -> Iterator[Result]:
    for index in indices:
        yield job.run(index, progress)


# --- local processes ---------------------------------------------------------------------------

_JOB = None


def _init_worker(work, devices, threads: int) -> None:
    """In a fresh worker process, before anything touches CUDA: its GPUs, its CPU threads."""
    global _JOB
    assigned = devices.get()
    if assigned is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = assigned
    import torch

    torch.set_num_threads(threads)
    _JOB = work.job()


def _worker_run(index: int) -> Result:
    return _JOB.run(index)


def _device_sets(work, workers: Workers) -> list[str | None]:
    import torch

    count, each = workers.count, workers.gpus_each
    if not (work.gpu and torch.cuda.is_available()):
        return [None] * count
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) < count * each:
        raise workers.error(
            f"{workers.stage}.workers={count} x {each} GPU(s) each needs {count * each} GPUs, "
            f"{len(ids)} are visible", hint=f"lower {workers.stage}.workers (or leave it null: one per GPU)"
        )
    return [",".join(ids[w * each : (w + 1) * each]) for w in range(count)]


def _run_pool(work, indices: list[int], workers: Workers) -> Iterator[Result]:
    todo = list(indices)
    for attempt in range(RETRIES + 1):
        context = multiprocessing.get_context("spawn")
        devices = context.Queue()
        for assigned in _device_sets(work, workers):
            devices.put(assigned)
        # On a CPU the thread count changes low-order bits (seen: one of 2,000 values, 4.8e-7):
        # every worker computes with the coordinator's count (work.cpu_threads), so that the bytes
        # do not depend on how many workers wrote them. On a GPU it only feeds the host side.
        threads = work.cpu_threads or max(1, (os.cpu_count() or 1) // workers.count)
        pool = ProcessPoolExecutor(workers.count, mp_context=context, initializer=_init_worker,
                                   initargs=(work, devices, threads))
        pending = {pool.submit(_worker_run, index): index for index in todo}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    result = future.result()  # a worker's error propagates as is
                    todo.remove(index)
                    yield result
            pool.shutdown()
            return
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            if attempt == RETRIES:
                raise workers.failed(f"{workers.stage} workers crashed {RETRIES + 1} times ({len(todo)} shards left; "
                                     "killed, or out of memory?)") from None
            workers.log.warning("%s: a worker crashed; running its %d unfinished shards again", workers.stage,
                                len(todo))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# --- Ray ---------------------------------------------------------------------------------------


class _ShardActor:
    """A Ray actor: one job (one model load) per worker."""

    def __init__(self, work):
        if work.cpu_threads:  # as _run_pool's workers: the coordinator's CPU numerics
            import torch

            torch.set_num_threads(work.cpu_threads)
        self.job = work.job()

    def run(self, index: int) -> Result:
        return self.job.run(index)


def _start_ray(workers: Workers):
    """Ray, started (a local one for this run) or joined (``workers.address``)."""
    try:
        import ray
    except ImportError:
        stage = workers.stage
        raise workers.error(f"{stage}.runner=ray needs Ray: pip install -e '.[ray]' (or {stage}.runner=local)") from None
    if workers.address is None:  # a local Ray for this run only, on the loopback interface
        # address "local": always a new instance. None would join a cluster that RAY_ADDRESS names
        # or that `ray start` left running on this machine, and then refuse num_cpus.
        ray.init(address="local", num_cpus=max(workers.count, 1), include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=workers.address, log_to_driver=False, configure_logging=False)
    return ray


def _run_ray(work, indices: list[int], workers: Workers) -> Iterator[Result]:
    ray = _start_ray(workers)
    from ray import exceptions as ray_errors
    from ray.util import ActorPool

    try:
        cuda = work.gpu and bool(ray.cluster_resources().get("GPU"))
        actor = ray.remote(num_cpus=1, num_gpus=workers.gpus_each if cuda else 0, max_restarts=RETRIES,
                           max_task_retries=RETRIES)(_ShardActor)
        pool = ActorPool([actor.remote(work) for _ in range(workers.count)])
        try:
            yield from pool.map_unordered(lambda worker, index: worker.run.remote(index), indices)
        except ray_errors.RayTaskError as exc:  # raised in a worker: a user error as itself
            if isinstance(exc.cause, DpoError):
                raise exc.cause from None
            raise
        except (ray_errors.RayActorError, ray_errors.WorkerCrashedError, ray_errors.OutOfMemoryError) as exc:
            # Ray restarted the dead worker and ran its shard again RETRIES times, and it died again.
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
            raise workers.failed(
                f"a Ray {workers.stage} worker died and Ray may not restart it again ({RETRIES} restarts per "
                f"worker; killed, or out of memory?): {why}. The shards written so far are kept"
            ) from None
    finally:
        ray.shutdown()
