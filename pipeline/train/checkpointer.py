"""When a run saves and what it resumes from: a checkpoint every train.save_steps steps (none at
the end: final/ is the end), the last train.save_total_limit kept, and on --resume the newest
one that loads (checkpoint.py writes, prunes and reads them).

    checkpointer = Checkpointer(trainer, run_dir, run_fingerprint, metrics_log)
    step = checkpointer.resume()          # the step the run goes on from, or TrainError
    checkpointer.maybe_save(done)         # after each step: when train.save_steps says so

A step that saves is also logged (``due`` tells the metrics log to read its window first), so
metrics.jsonl holds every record up to a checkpoint's step, what a resumed run keeps.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from pipeline.errors import TrainError
from pipeline.train.checkpoint import load_latest_checkpoint, restore_training, save_training
from pipeline.train.metrics_log import MetricsLog

log = logging.getLogger("dpo.train")


class Checkpointer:
    """The checkpoints of one run's trainer, in ``run_dir``/checkpoints, of the run ``fingerprint``."""

    def __init__(self, trainer, run_dir: Path, fingerprint: str, metrics_log: MetricsLog):
        self.trainer, self.run_dir, self.fingerprint, self.metrics_log = trainer, run_dir, fingerprint, metrics_log

    def due(self, done: int) -> bool:
        """Whether the step that ends with ``done`` steps saves."""
        every = self.trainer.cfg.train.save_steps
        return bool(every) and done % every == 0 and done < self.trainer.total_steps

    def maybe_save(self, done: int) -> None:
        """Save the state after ``done`` steps when due (a collective: every rank calls it), its time
        left out of the metrics log's tokens/s."""
        if self.due(done):
            with self.metrics_log.paused():
                save_training(self.trainer, self.run_dir, done, self.fingerprint)

    def resume(self) -> int:
        """Load the newest checkpoint that loads (a damaged one is skipped) into the trainer; its
        step. Refuses when none loads or it belongs to another configuration."""
        trainer = self.trainer
        loaded = load_latest_checkpoint(self.run_dir, functools.partial(restore_training, trainer))
        if loaded is None:
            raise TrainError(
                f"no checkpoint of {self.run_dir} can be loaded (all are damaged)", hint="delete the folder "
                "(or set another train.run_name) and train again"
            )
        path, state = loaded
        if state.get("run_fingerprint") != self.fingerprint:
            raise TrainError(f"the checkpoint {path} belongs to another configuration")
        log.info("train: resumed from %s (step %d of %d)", path.name, state["step"], trainer.total_steps)
        return state["step"]
