"""Experiment trackers: train and eval metrics where people look at them (``train.report_to``).

    trackers = open_trackers(["tensorboard", "mlflow"], run_dir, config)
    trackers.log({"loss": 0.69, "eval/loss": 0.68, ...}, step=10)
    trackers.close()

The names and semantics are TRL's / Hugging Face's ``report_to``: ``none``, ``tensorboard``,
``mlflow``, ``wandb``, ``trackio``, or a list. Each tracker is its own library, imported only when
chosen, configured the way that library is configured everywhere (MLFLOW_TRACKING_URI and
MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT / WANDB_MODE, TRACKIO_PROJECT); keys are rewritten as
Hugging Face's callbacks do: train metrics under ``train/`` (``train/loss``,
``train/learning_rate``), eval metrics under ``eval/``. metrics.jsonl in the run folder stays
the record of truth; trackers are views of it. Only rank 0 of a distributed run reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import TrackerError

REPORTERS = ("tensorboard", "mlflow", "wandb", "trackio")
PROJECT = "dpo-pipeline"


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerError(
            f"train.report_to includes {extra} but {module} is not installed: pip install -e '.[{extra}]' "
            f"(or remove {extra} from train.report_to)"
        ) from None


def _rewrite(metrics: dict) -> dict:
    """Numeric metrics under train/ or eval/ (as transformers' rewrite_logs), without the step."""
    out = {}
    for key, value in metrics.items():
        if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out[key if key.startswith(("eval/", "step0/")) else f"train/{key}"] = float(value)
    return out


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TensorBoard:
    """Event files in <run_dir>/runs/ (TensorBoard: `tensorboard --logdir <run_dir>/runs`)."""

    def __init__(self, run_dir: Path, config: dict):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "runs"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, metrics: dict, step: int) -> None:
        for key, value in _rewrite(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """An MLflow run named after the run folder; tracking URI from MLFLOW_TRACKING_URI, else a
    file store in <run_dir>/mlruns; experiment MLFLOW_EXPERIMENT_NAME, else dpo-pipeline."""

    def __init__(self, run_dir: Path, config: dict):
        mlflow = _require("mlflow", "mlflow")
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps its file store behind this switch ("maintenance mode"); it needs no
            # server and no database, which is what a run folder wants. A server wins when set.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(run_dir) / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
        self.run = mlflow.start_run(run_name=Path(run_dir).name)
        params = {k: str(v)[:500] for k, v in _flat(config).items()}
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(list(params.items())[start : start + 100]))

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics(_rewrite(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Wandb:
    """A Weights & Biases run (WANDB_PROJECT, else dpo-pipeline; WANDB_MODE=offline works offline)."""

    def __init__(self, run_dir: Path, config: dict):
        self.wandb = _require("wandb", "wandb")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=Path(run_dir).name,
                                   config=config, dir=str(run_dir))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_rewrite(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A trackio run (TRACKIO_PROJECT, else dpo-pipeline)."""

    def __init__(self, run_dir: Path, config: dict):
        self.trackio = _require("trackio", "trackio")
        self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=Path(run_dir).name, config=config)

    def log(self, metrics: dict, step: int) -> None:
        self.trackio.log(_rewrite(metrics), step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb, "trackio": Trackio}


class Trackers:
    """The chosen trackers as one; logging to none of them is a no-op."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, metrics: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_trackers(report_to: list[str], run_dir: Path, config: dict) -> Trackers:
    return Trackers([TRACKERS[name](run_dir, config) for name in report_to if name != "none"])
