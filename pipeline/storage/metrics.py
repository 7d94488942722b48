"""A run's metrics log, <run dir>/metrics.jsonl (paths.METRICS): one JSON record per line.

    metrics.append(metrics.path_of(run_dir), {"step": 3, "loss": 0.69, ...})   # train, rank 0
    records = metrics.read(metrics.path_of(run_dir))                           # report, model card, status
    metrics.truncate(metrics.path_of(run_dir), step=40)                        # --resume from step 40
    record = metrics.averaged(step_records)        # one record per train.logging_steps steps

Training appends a record per logged step and eval and flushes each, so a kill leaves at most
its last line cut short: ``read`` skips such a line; ``truncate`` (what a resumed run does)
keeps the records up to the checkpoint's step, and with them drops a cut line, always later.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.storage.paths import METRICS
from pipeline.store import atomic_write_text


def path_of(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def append(path: Path, record: dict) -> None:
    """Add one record, flushed (`dpo status` and the run report read the file during the run)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(_line(record))
        fh.flush()


def read(path: Path) -> list[dict]:
    """Every record, in order; [] when there is no file; a line cut by a kill is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill (or blank)
    return records


def truncate(path: Path, step: int) -> None:
    """Drop what a killed run logged after the checkpoint (of step ``step``) it resumes from."""
    kept = [r for r in read(path) if r["step"] <= step]
    atomic_write_text(path, "".join(_line(r) for r in kept))


def averaged(records: list[dict]) -> dict:
    """One metrics record for several steps: means, with the last step's step, epoch and learning_rate (as
    Hugging Face logs every logging_steps)."""
    last = records[-1]
    out = {key: sum(r[key] for r in records) / len(records) for key in last}
    out.update(step=last["step"], epoch=last["epoch"], learning_rate=last["learning_rate"])
    return out
