"""Where shard jobs run: in this process, in N local worker processes, or on a Ray cluster.

    for entry, stats, settings in run_shards(work, missing, Workers("local", count=2)):
        ...   # one result per shard, in completion order

Each worker loads the model once (a ``shards.ShardJob``) and takes shards until none is left;
workers get paths and shard indices, never data. The coordinator (the score stage) is the
only writer of the manifest, so the shards' completion order does not matter.

- ``local``: ``concurrent.futures.ProcessPoolExecutor`` (spawn), one process per worker, each
  pinned to its own GPUs (CUDA_VISIBLE_DEVICES, ``gpus_per_worker`` each) before CUDA starts.
  A crashed worker (killed, out of memory) breaks the pool: the shards it had not finished are
  run again by a fresh pool (``RETRIES`` times); finished shards are kept.
- ``ray``: one Ray actor per worker (``num_gpus=gpus_per_worker``: Ray places them), fed by
  ``ray.util.ActorPool``; a dead actor is restarted and its shard retried by Ray itself
  (``max_restarts`` / ``max_task_retries``), ``RETRIES`` times, then the run stops with a
  ScoreError (the finished shards are kept). ``address`` None starts a local Ray on 127.0.0.1
  for the run and stops it after (never a cluster already running here); otherwise it joins
  that cluster, which needs this package importable on every node and the storage on a
  filesystem every node can write.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterator

from pipeline.errors import ScoreError
from pipeline.score.shards import ShardJob, ShardWork

log = logging.getLogger("dpo.score")

RETRIES = 2
"""Times a crashed worker's unfinished shards are run again."""

Result = tuple[dict, dict, dict | None]
"""(manifest entry, stats, the scorer settings of the worker that wrote the shard)."""


def default_workers(device: str, gpus_per_worker: int = 1) -> int:
    """One worker per visible GPU (per gpus_per_worker of them), one on the CPU."""
    if device == "cpu":
        return 1
    import torch

    return max(1, torch.cuda.device_count() // gpus_per_worker) if torch.cuda.is_available() else 1


@dataclass
class Workers:
    """Where the shards run: ``runner`` (local | ray), ``count`` workers of ``gpus_each`` GPUs,
    and for Ray the cluster's ``address`` (None: a local Ray for the run)."""

    runner: str = "local"
    count: int = 1
    gpus_each: int = 1
    address: str | None = None


def run_shards(work: ShardWork, indices: list[int], workers: Workers, job: ShardJob | None = None,
               progress=None) -> Iterator[Result]:
    """Run the shards ``indices`` of ``work``; one local worker runs them in this process, with
    ``job`` (a loaded ShardJob) when given and ``progress`` called as each batch is scored."""
    if not indices:
        return iter(())
    if workers.runner == "ray":
        return _run_ray(work, indices, workers.count, workers.gpus_each, workers.address)
    if workers.count <= 1:
        return _run_here(job or ShardJob(work), indices, progress)
    return _run_pool(work, indices, workers.count, workers.gpus_each)


def _run_here(job: ShardJob, indices: list[int], progress) -> Iterator[Result]:
    for index in indices:
        entry, stats = job.run(index, progress)
        yield entry, stats, job.settings()


# --- local processes ---------------------------------------------------------------------------

_JOB: ShardJob | None = None


def _init_worker(work: ShardWork, devices, threads: int) -> None:
    """In a fresh worker process, before anything touches CUDA: its GPUs, its CPU threads."""
    global _JOB
    assigned = devices.get()
    if assigned is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = assigned
    import torch

    torch.set_num_threads(threads)
    _JOB = ShardJob(work)


def _worker_run(index: int) -> Result:
    entry, stats = _JOB.run(index)
    return entry, stats, _JOB.settings()


def _device_sets(workers: int, gpus_per_worker: int, work: ShardWork) -> list[str | None]:
    import torch

    cuda = work.config.get("score", {}).get("device", "auto") != "cpu" and torch.cuda.is_available()
    if not cuda:
        return [None] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) < workers * gpus_per_worker:
        raise ScoreError(
            f"score.workers={workers} x {gpus_per_worker} GPU(s) each needs {workers * gpus_per_worker} GPUs, "
            f"{len(ids)} are visible", hint="lower score.workers (or leave it null: one per GPU)"
        )
    return [",".join(ids[w * gpus_per_worker : (w + 1) * gpus_per_worker]) for w in range(workers)]


def _run_pool(work: ShardWork, indices: list[int], workers: int, gpus_per_worker: int) -> Iterator[Result]:
    todo = list(indices)
    for attempt in range(RETRIES + 1):
        context = multiprocessing.get_context("spawn")
        devices = context.Queue()
        for assigned in _device_sets(workers, gpus_per_worker, work):
            devices.put(assigned)
        # On a CPU the thread count changes low-order bits (seen: one of 2,000 values, 4.8e-7):
        # every worker computes with the coordinator's count (work.cpu_threads), so that the bytes
        # do not depend on how many workers wrote them. On a GPU it only feeds the host side.
        threads = work.cpu_threads or max(1, (os.cpu_count() or 1) // workers)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                   initargs=(work, devices, threads))
        pending = {pool.submit(_worker_run, index): index for index in todo}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    result = future.result()  # a worker's ScoreError propagates as is
                    todo.remove(index)
                    yield result
            pool.shutdown()
            return
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            if attempt == RETRIES:
                raise ScoreError(
                    f"score workers crashed {RETRIES + 1} times ({len(todo)} shards left; killed, or out of "
                    "memory?)", hint="run `dpo score` again to resume, with fewer score.workers if memory is short"
                ) from None
            log.warning("score: a worker crashed; running its %d unfinished shards again", len(todo))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# --- Ray ---------------------------------------------------------------------------------------


class _ShardActor:
    """A Ray actor: one ShardJob (one model load) per worker."""

    def __init__(self, work: ShardWork):
        if work.cpu_threads:  # as _run_pool's workers: the coordinator's CPU numerics
            import torch

            torch.set_num_threads(work.cpu_threads)
        self.job = ShardJob(work)

    def run(self, index: int) -> Result:
        entry, stats = self.job.run(index)
        return entry, stats, self.job.settings()


def _run_ray(work: ShardWork, indices: list[int], workers: int, gpus_per_worker: int,
             address: str | None) -> Iterator[Result]:
    try:
        import ray
        from ray import exceptions as ray_errors
        from ray.util import ActorPool
    except ImportError:
        raise ScoreError("score.runner=ray needs Ray: pip install -e '.[ray]' (or score.runner=local)") from None
    started_here = address is None
    if started_here:  # a local Ray for this run only, on the loopback interface
        # address "local": always a new instance. None would join a cluster that RAY_ADDRESS names
        # or that `ray start` left running on this machine, and then refuse num_cpus.
        ray.init(address="local", num_cpus=max(workers, 1), include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        cuda = work.config.get("score", {}).get("device", "auto") != "cpu" and bool(ray.cluster_resources().get("GPU"))
        actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker if cuda else 0, max_restarts=RETRIES,
                           max_task_retries=RETRIES)(_ShardActor)
        pool = ActorPool([actor.remote(work) for _ in range(workers)])
        try:
            yield from pool.map_unordered(lambda worker, index: worker.run.remote(index), indices)
        except ray_errors.RayTaskError as exc:  # raised in a worker: a ScoreError as itself
            if isinstance(exc.cause, ScoreError):
                raise exc.cause from None
            raise
        except (ray_errors.RayActorError, ray_errors.WorkerCrashedError, ray_errors.OutOfMemoryError) as exc:
            # Ray restarted the dead worker and ran its shard again RETRIES times, and it died again.
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
            raise ScoreError(
                f"a Ray score worker died and Ray may not restart it again ({RETRIES} restarts per worker; "
                f"killed, or out of memory?): {why}. The shards written so far are kept", hint="run `dpo score` "
                "again to resume, with fewer score.workers if memory is short"
            ) from None
    finally:
        ray.shutdown()
