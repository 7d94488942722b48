"""A run's metrics where people see them, and when a step's metrics are read: metrics.jsonl
(storage.metrics), train.report_to's trackers, report.html at each eval, the progress bar.

    with MetricsLog.opened(trainer, run_dir) as metrics_log:   # the trackers closed however it ends
        metrics_log.start_at(step)             # a new metrics.jsonl, or kept up to a resumed step
        metrics_log.write(record)              # a record as it is (the step-0 check, an eval)
        with metrics_log.progress(step, show):
            metrics_log.after_step(record, flush=checkpointer.due(done))
            with metrics_log.paused(): ...     # eval and saving left out of tokens/s

A step's record stays on the device (Trainer.train_step) until a logged step reads the window of
records since the last one in one transfer (Trainer.read_records: the loop's one host sync, which
stops the run when a step was non-finite) and writes their mean: every train.logging_steps steps,
at the last step, and before a checkpoint (a resumed run keeps the records up to its step). Only
rank 0 writes; the others computed the same records.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from pipeline.errors import TrackerError, TrainError
from pipeline.models import compiling
from pipeline.progress import Progress
from pipeline.reports.run_report import write_run_report
from pipeline.storage import metrics
from pipeline.train.trackers import Trackers, open_trackers

log = logging.getLogger("dpo.train")


class MetricsLog:
    """metrics.jsonl, the trackers, the report and the bar of one run, and its logging cadence."""

    def __init__(self, trainer, run_dir: Path, trackers: Trackers):
        self.trainer, self.trackers = trainer, trackers
        self.path = metrics.path_of(run_dir)
        self.window: list[dict] = []  # step records since the last logged one, on the device
        self.started = time.perf_counter()  # of the window's training time (eval and saving left out)
        self.first_graphs: int | None = None  # graphs compiled by the end of the first step (torch_compile)
        self.bar: Progress | None = None

    @classmethod
    @contextlib.contextmanager
    def opened(cls, trainer, run_dir: Path):
        """The run's metrics log with train.report_to's trackers open (rank 0), closed on exit."""
        trackers = Trackers([])
        if trainer.world.main:
            try:
                trackers = open_trackers(trainer.cfg.train.report_to, run_dir, trainer.cfg.to_dict())
            except TrackerError as exc:
                raise TrainError(str(exc)) from None
        try:
            yield cls(trainer, run_dir, trackers)
        finally:
            trackers.close()

    def start_at(self, step: int) -> None:
        """metrics.jsonl of a run starting at ``step``: a new one at 0; else (a resumed run, from
        its checkpoint's step) the records up to ``step``, without what a killed run logged later."""
        if not self.trainer.world.main:
            return
        if step:
            metrics.truncate(self.path, step)
        else:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        """Append a metrics record and show it to the trackers (rank 0); an eval's also redraws
        report.html, watchable during the run."""
        if self.trainer.world.main:
            metrics.append(self.path, record)
            self.trackers.log(record, record["step"])
            if "eval/loss" in record and record["step"] > 0:
                write_run_report(self.path.parent, metrics.read(self.path), self.trainer.cfg.to_dict())

    @contextlib.contextmanager
    def progress(self, start_step: int, show: bool):
        """The progress bar of the steps from ``start_step`` (rank 0's; the other ranks' log to a
        quiet logger), refreshed at most every 10 s under torchrun, whose tee prints each refresh."""
        trainer = self.trainer
        with Progress(trainer.total_steps, "train", "steps", show,
                      log if trainer.world.main else logging.getLogger("dpo.quiet"), initial=start_step,
                      mininterval=10 if trainer.world.size > 1 else 0.1) as self.bar:
            self.started = time.perf_counter()
            yield self.bar

    def after_step(self, record: dict, flush: bool = False) -> None:
        """Keep step ``record`` (tensors on the device); read and write the window's mean when the
        step is logged: every train.logging_steps steps, the last step, or ``flush`` (a checkpoint
        follows)."""
        trainer = self.trainer
        self.window.append(record)
        if trainer.compiled and self.first_graphs is None:
            self.first_graphs = compiling.graphs_compiled()
        self.bar.update(1)
        done = record["step"]
        if done % trainer.cfg.train.logging_steps and done != trainer.total_steps and not flush:
            return
        records = trainer.read_records(self.window, time.perf_counter() - self.started)  # the one host sync
        mean = metrics.averaged(records)
        if trainer.compiled:
            graphs = compiling.graphs_compiled()
            mean.update({"compile/graphs": graphs, "compile/recompiles": graphs - self.first_graphs})
        self.write(mean)
        self.bar.set_postfix_str(f"loss {mean['loss']:.4f} acc {mean['rewards/accuracies']:.2f} "
                                 f"lr {mean['learning_rate']:.2e} {mean['tokens/s']:,.0f} tok/s", refresh=False)
        self.window, self.started = [], time.perf_counter()

    def check_guard(self) -> None:
        """Raise TrainError when a step since the last logged one was non-finite (the guard read
        alone, Trainer.read_records of no record); right after a logged step there is nothing new
        to read, so nothing is."""
        if self.window:
            self.trainer.read_records([])

    @contextlib.contextmanager
    def paused(self):
        """Time that is not training (eval, saving) left out of the window's tokens/s."""
        paused = time.perf_counter()
        yield
        self.started = time.perf_counter() if not self.window else self.started + (time.perf_counter() - paused)
