"""The `sweep:` section of a config: which runs a hyper-parameter sweep trains over one reference.

    sweep:
      grid: {train.beta: [0.05, 0.1], train.loss_type: [sigmoid, ipo]}   # the product: 4 runs
      points: [{train.beta: 0.3, train.learning_rate: 1e-6}]             # and listed runs
      max_parallel: 2

Only the section's own shape is checked here; each point's keys and values are checked by
building its config (flows/sweep_plan.py), so a bad one is named before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.config.checks import check_folder_name, check_range
from pipeline.errors import ConfigError

SWEEP_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                 "logps/chosen", "logps/rejected")
"""The eval metrics a sweep's table can be sorted by (`eval/` prefix optional)."""


@dataclass
class SweepConfig:
    """A sweep (`dpo sweep`): one training run per point, all over the same prepared data and
    reference cache; the rest of the config is every point's base."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted config keys and the values to try, e.g. {train.beta: [0.05, 0.1]}: one point per
    combination (the product of the lists). `--grid KEY=V1,V2` (of `dpo sweep`) adds or replaces a key."""
    points: list[dict[str, Any]] = field(default_factory=list)
    """Explicit points, each a mapping of dotted keys to values, e.g. [{train.beta: 0.3}]; trained
    besides the grid's."""
    name: Optional[str] = None
    """The sweep's name: sweeps/<name>/ holds its report, and its runs are
    runs/<name>_<key>-<value>_...; null: the config file's name (`dpo sweep`), else a name made
    from the sweep's points."""
    max_parallel: Optional[int] = None
    """Points trained at once; null: one per visible GPU (each pinned to its GPUs), one on a CPU."""
    metric: str = "eval/rewards/accuracies"
    """The eval metric the sweep's table is sorted by, best first (lowest first for a loss)."""

    def validate(self) -> None:
        if self.name is not None:
            check_folder_name("sweep.name", self.name, "beta-sweep")
        if self.max_parallel is not None:
            check_range("sweep.max_parallel", self.max_parallel, 1, None)
        if self.metric.removeprefix("eval/") not in SWEEP_METRICS:
            raise ConfigError(f"sweep.metric: {self.metric!r} is not an eval metric", hint="choose one of "
                              f"{', '.join('eval/' + m for m in SWEEP_METRICS)}")
        for key, values in self.grid.items():
            if not values:
                raise ConfigError(f"sweep.grid: {key} has no values", hint=f"give at least one, e.g. {key}: [0.1, 0.3]")
        for i, point in enumerate(self.points):
            if not point:
                raise ConfigError(f"sweep.points[{i}] is empty", hint="name at least one key, e.g. {train.beta: 0.3}")
