"""Shared by the benchmark scripts: where the data is, an HH slice, the JSON report."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH_TEST = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"


def hh_slice(directory: str | Path, rows: int) -> Path:
    """The first ``rows`` lines of the HH-RLHF harmless-base test file, as a JSONL file."""
    path = Path(directory) / f"hh-{rows}.jsonl"
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as src:
        path.write_text("".join(line for _, line in zip(range(rows), src)))
    return path


def write_report(path: str | Path, report: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
