"""Shared by the benchmark scripts: where the data is, an HH slice, the start of a bench main
(``bench_parser``) and its end (``finish``: the JSON report).

The scripts run as ``python bench/NAME.py`` from the repository root, so bench/ is ``sys.path[0]``
and ``from _common import ...`` works; importing this module also puts the repository root on
``sys.path`` (right after bench/), so ``pipeline`` and ``flows`` import from this tree whether it
is installed (.venv: editable) or not (the lent GPU machine: ``PYTHONPATH=.``, or nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH_TEST = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
RESULTS = ROOT / "bench" / "results"

if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))


def hh_slice(directory: str | Path, rows: int) -> Path:
    """The first ``rows`` lines of the HH-RLHF harmless-base test file, as a JSONL file."""
    import gzip

    path = Path(directory) / f"hh-{rows}.jsonl"
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as src:
        path.write_text("".join(line for _, line in zip(range(rows), src)))
    return path


def bench_parser(doc: str, out: str | None = None, *, gpu: bool = False,
                 whole_doc: bool = False) -> argparse.ArgumentParser:
    """The command line every bench main starts with: the description is ``doc``'s first line (all of
    ``doc``, as written, with ``whole_doc``), and ``--out`` (a Path) defaults to bench/results/``out``,
    or $OUT/``out`` with ``gpu`` where $OUT is set (the lent GPU machine's folder of files that come
    back). No ``out``: no ``--out``."""
    if whole_doc:
        parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if out is not None:
        folder = Path(os.environ["OUT"]) if gpu and os.environ.get("OUT") else RESULTS
        parser.add_argument("--out", type=Path, default=folder / out)
    return parser


def save_report(path: str | Path, report: dict) -> None:
    """``report`` as indented JSON at ``path`` (folders made); what JSON cannot hold, as str()."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def finish(path: str | Path, report: dict, failed: bool = False) -> int:
    """The end of a bench main: the report written (``wrote PATH``), and the exit status (1 if failed)."""
    save_report(path, report)
    print(f"\nwrote {path}")
    return 1 if failed else 0
