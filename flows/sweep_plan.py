"""A sweep's points, each a whole run config, checked before anything runs; where its records are.

    sweep = plan_sweep(cfg, grid={"train.beta": [0.05, 0.1]}, default_name="run")
    [p.name for p in sweep.points]    # ['run_beta-0.05', 'run_beta-0.1']: runs/<name>/

A point is the base config (every section but `sweep:`) with its overrides set, named after
them (train.run_name), so it is a normal run: `dpo train` with the same overrides makes the same
run fingerprint. Refused before any work, naming the key: an unknown key, a value of the wrong
type, an empty grid, a key the sweep sets itself, two points that would be the same run, and a
point whose run folder holds a finished run of another configuration. No Prefect here, so
`dpo status` starts fast.

Under storage: sweeps/<name>/sweep.json (the points), points/<point>.json (each point's last
state, written by the flow), report.html (pipeline/reports/sweep_report.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.load import config_with
from pipeline.config.schema import RUN_NAME, Config
from pipeline.config.sweep import SweepConfig
from pipeline.errors import ConfigError
from pipeline.reports.sweep_report import metric_name
from pipeline.storage import trust
from pipeline.store import atomic_write_text, read_json

from flows.plan import planned_run

SWEEPS = "sweeps"
SET_BY_THE_SWEEP = ("train.run_name", "storage")
"""Keys a point may not set: the sweep names its runs, and keeps them in one storage."""


@dataclass(frozen=True)
class SweepPoint:
    name: str
    """The run's name (train.run_name): runs/<name>/."""
    overrides: dict[str, Any]
    config: Config
    fingerprint: str
    planned: dict[str, Path]
    """plan(config): every stage's output folder for this point."""

    @property
    def run_dir(self) -> Path:
        return self.planned["train"]

    def needs_reference(self) -> bool:
        return self.config.train.needs_reference()


@dataclass
class SweepPlan:
    name: str
    metric: str
    max_parallel: int | None
    storage: Path
    points: list[SweepPoint] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.storage / SWEEPS / self.name


def parse_grid(items: list[str]) -> dict[str, list]:
    """`--grid KEY=V1,V2` items as {key: [values]}, each value as YAML reads it (0.1 a number,
    sigmoid a string, [sigmoid,sft] a list); a key given twice keeps its last values."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid train.beta=0.05,0.1")
        try:
            values = yaml.safe_load(f"[{text}]")
        except yaml.YAMLError:
            raise ConfigError(f"--grid {item!r}: the values of {key} are not a comma-separated list "
                              "(quote a value that holds a comma or a bracket)") from None
        grid[key.strip()] = values
    return grid


def point_overrides(spec: SweepConfig) -> list[dict[str, Any]]:
    """The grid's points (the product of its value lists, in order), then the listed points."""
    keys = list(spec.grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*spec.grid.values())] if keys else []
    return combos + [dict(point) for point in spec.points]


def _folder_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def _value_text(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_value_text(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}-{_value_text(v)}" for k, v in value.items())
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return str(value)


def point_names(sweep: str, overrides: list[dict[str, Any]]) -> list[str]:
    """A readable, folder-safe run name per point: <sweep>_<key>-<value>_..., keys by their last
    part unless two keys share it; a name too long or shared by two points ends with a hash."""
    keys = list(dict.fromkeys(k for point in overrides for k in point))
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    clash = {k for k in keys if list(short.values()).count(short[k]) > 1}
    names = []
    for point in overrides:
        parts = [f"{k if k in clash else short[k]}-{_value_text(v)}" for k, v in point.items()]
        names.append(_folder_safe("_".join([sweep, *parts])))
    for i, (name, point) in enumerate(zip(names, overrides)):
        if len(name) > 100 or names.count(name) > 1:
            digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]
            names[i] = f"{name[:91]}_{digest}"
    return names


def _name(cfg: Config, spec: SweepConfig, overrides: list[dict], default_name: str | None) -> str:
    if spec.name:
        return spec.name
    if default_name:
        cleaned = _folder_safe(default_name).strip("-._")[:60]
        if cleaned and RUN_NAME.fullmatch(cleaned):
            return cleaned
    base = {k: v for k, v in cfg.to_dict().items() if k != "sweep"}
    text = json.dumps([base, overrides], sort_keys=True, default=str)
    return f"sweep-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _check_keys(overrides: list[dict[str, Any]]) -> None:
    for point in overrides:
        for key in point:
            if key.split(".")[0] == "sweep" or key in SET_BY_THE_SWEEP:
                raise ConfigError(f"sweep: {key} cannot be swept: the sweep sets it for every point "
                                  "(name the sweep with sweep.name)")


def _point(cfg: Config, name: str, overrides: dict[str, Any]) -> SweepPoint:
    raw = {**cfg.to_dict(), "sweep": None}
    try:
        point_cfg = config_with(raw, {**overrides, "train.run_name": name})
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise ConfigError(f"sweep point {shown}: {exc}") from None
    planned, fingerprint = planned_run(point_cfg)
    return SweepPoint(name, overrides, point_cfg, fingerprint, planned)


def _check_distinct(points: list[SweepPoint]) -> None:
    seen: dict[str, SweepPoint] = {}
    for point in points:
        other = seen.setdefault(point.fingerprint, point)
        if other is point:
            continue
        keys = sorted(k for k in {*point.overrides, *other.overrides}
                      if point.overrides.get(k) != other.overrides.get(k))
        raise ConfigError(
            f"sweep: points {other.name} and {point.name} would be the same run (fingerprint "
            f"{point.fingerprint[:12]}): changing {', '.join(keys) or 'their overrides'} does not change what "
            "a run trains (train.logging_steps and the like are not part of a run's identity); sweep another key")


def _check_folders(points: list[SweepPoint]) -> None:
    for point in points:
        summary = trust.verified_run(point.run_dir)
        if summary is not None and summary.get("fingerprint") != point.fingerprint:
            raise ConfigError(
                f"sweep: {point.run_dir} holds a finished run of another configuration", hint="name the sweep "
                "differently (sweep.name, e.g. --set sweep.name=NAME-2) or delete that folder")


def plan_sweep(cfg: Config, grid: dict[str, list] | None = None, default_name: str | None = None) -> SweepPlan:
    """The sweep of ``cfg``'s `sweep:` section, with ``grid`` (from `--grid`) adding or replacing
    grid keys; ``default_name`` (the config file's name) when sweep.name is unset."""
    spec = cfg.sweep or SweepConfig()
    if grid:
        spec = dataclasses.replace(spec, grid={**spec.grid, **grid})
        spec.validate()
    overrides = point_overrides(spec)
    if not overrides:
        raise ConfigError("nothing to sweep", hint="give --grid KEY=V1,V2 (e.g. --grid train.beta=0.05,0.1) or a "
                          "sweep: section with grid or points in the config")
    _check_keys(overrides)
    name = _name(cfg, spec, overrides, default_name)
    names = point_names(name, overrides)
    points = [_point(cfg, n, o) for n, o in zip(names, overrides)]
    _check_distinct(points)
    _check_folders(points)
    return SweepPlan(name, metric_name(spec.metric), spec.max_parallel, Path(cfg.storage), points)


def write_sweep_json(sweep: SweepPlan) -> Path:
    """sweeps/<name>/sweep.json: the sweep's points (name, overrides, run folder, fingerprint)."""
    path = sweep.directory / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    points = [{"name": p.name, "overrides": p.overrides, "run_dir": str(p.run_dir), "fingerprint": p.fingerprint}
              for p in sweep.points]
    atomic_write_text(path, json.dumps({"name": sweep.name, "metric": sweep.metric, "points": points},
                                       indent=1, default=str))
    return path


def point_file(sweep_dir: str | Path, point: str) -> Path:
    return Path(sweep_dir) / "points" / f"{point}.json"


def record_point(sweep_dir: str | Path, point: str, state: str, **extra: Any) -> dict:
    """Keep a point's state (and its wall time, error) in sweeps/<name>/points/<point>.json."""
    path = point_file(sweep_dir, point)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**read_point(sweep_dir, point), "state": state, **extra}
    atomic_write_text(path, json.dumps(record, default=str))
    return record


def read_point(sweep_dir: str | Path, point: str) -> dict:
    """What the flow last recorded for a point ({} when nothing)."""
    return read_json(point_file(sweep_dir, point)) or {}


def point_state(sweep: SweepPlan, point: SweepPoint) -> str:
    """finished (a verified run of this point's fingerprint), else what the flow last recorded
    (running, failed, ...), else not started."""
    summary = trust.verified_run(point.run_dir)
    if summary is not None and summary.get("fingerprint") == point.fingerprint:
        return "finished"
    recorded = read_point(sweep.directory, point.name).get("state")
    if recorded in (None, "finished", "skipped"):  # a run folder deleted since
        return "not started"
    return recorded


def report_points(sweep: SweepPlan) -> list[dict]:
    """The points as pipeline/reports/sweep_report.py takes them."""
    points = []
    for point in sweep.points:
        wall_s = read_point(sweep.directory, point.name).get("wall_s")
        points.append({"name": point.name, "overrides": point.overrides, "run_dir": str(point.run_dir),
                       "state": point_state(sweep, point), "wall_s": wall_s})
    return points
