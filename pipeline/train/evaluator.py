"""The eval split's metrics, and when they are computed: at the start (step 0), every
train.eval_steps steps, and at the end; each one written to the metrics log.

    evaluator = Evaluator(trainer, metrics_log)
    first = evaluator.evaluate(0)          # {"step": 0, "eval/loss": ..., "eval/rewards/accuracies": ...}
    evaluator.maybe_evaluate(done)         # after each step: when train.eval_steps says so
    last = evaluator.evaluate(trainer.total_steps)

The loss is the training objective's (loss.pair_objective) on the eval pairs, unscaled, its metrics
the means over the split; a run without eval pairs has none ({}).
"""

from __future__ import annotations

import logging
import math

import torch

from pipeline.train.loss import add_sums, pair_objective, read_sums
from pipeline.train.metrics_log import MetricsLog

log = logging.getLogger("dpo.train")


class Evaluator:
    """The eval of one run's trainer, written to ``metrics_log``."""

    def __init__(self, trainer, metrics_log: MetricsLog):
        self.trainer, self.metrics_log = trainer, metrics_log

    def due(self, done: int) -> bool:
        """Whether the step that ends with ``done`` steps evaluates (the end has its own eval)."""
        every = self.trainer.cfg.train.eval_steps
        return bool(every) and done % every == 0 and done < self.trainer.total_steps

    def maybe_evaluate(self, done: int) -> None:
        """Evaluate after ``done`` steps when due: the run's guard checked first (no eval of a run
        that has stopped; the wait for the step counts as training time), then the eval, its time
        left out of the metrics log's tokens/s."""
        if not self.due(done):
            return
        self.metrics_log.check_guard()
        with self.metrics_log.paused():
            record = self.evaluate(done)
        if record:
            log.info("eval step %d: loss %.4f, reward accuracy %.3f", done, record["eval/loss"],
                     record["eval/rewards/accuracies"])

    def evaluate(self, step: int) -> dict:
        """Eval-split metrics at ``step``, written to the metrics log ({} without eval pairs). Each
        rank scores every world-size-th pair (all ranks make the same number of forward passes, as
        FSDP2 needs; a rank with no pair left repeats pair 0 and discards it)."""
        trainer = self.trainer
        split, world = trainer.splits["eval"], trainer.world
        if not len(split):
            return {}
        trainer.engine.eval()
        totals: dict = {}
        share = list(range(world.rank, len(split), world.size))
        longest = math.ceil(len(split) / world.size)
        size = trainer.cfg.train.per_device_eval_batch_size
        with torch.no_grad():
            for start in range(0, longest, size):
                index = share[start : start + size]
                tokens = trainer.token_logps(split, index or [0], log_sum_sq=trainer.cfg.train.use_weighting)
                if not index:
                    continue
                objective = pair_objective(trainer.cfg, split, index, 1.0, trainer.reference)
                _, sums = objective(range(len(index)), tokens.values, tokens.lengths, tokens.log_sum_sq)
                add_sums(totals, sums)  # on the device: read once, below
        trainer.engine.train()
        totals = read_sums(world.sum(totals))
        record = {"step": step, **{f"eval/{k}": v / len(split) for k, v in totals.items()}}
        self.metrics_log.write(record)
        return record
