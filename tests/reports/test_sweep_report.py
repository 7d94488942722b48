"""The sweep's report (pipeline/reports/sweep_report.py) on synthetic run folders: no model is trained."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from pipeline.reports.sweep_report import (
    DEFAULT_METRIC,
    SWEEP_REPORT,
    lower_is_better,
    metric_name,
    sweep_rows,
    write_sweep_report,
)

BLUE = (31, 119, 180)  # matplotlib's first default line colour


def _eval_record(step: int, loss: float, accuracy: float, margin: float) -> dict:
    return {"step": step, "eval/loss": loss, "eval/rewards/accuracies": accuracy, "eval/rewards/margins": margin,
            "eval/rewards/chosen": margin / 2, "eval/rewards/rejected": -margin / 2}


def make_point(storage: Path, name: str, final: dict | None = None, evals: tuple = (), **point) -> dict:
    """A sweep point whose run folder (runs/run-<n>) holds what a run leaves: metrics.jsonl with a
    train record per step and ``evals`` ((step, loss, accuracy, margin)); report.html and a complete
    run.json whose final_eval is ``final``, when given (a finished run)."""
    runs = storage / "runs"
    run_dir = runs / f"run-{len(list(runs.iterdir())) if runs.is_dir() else 0}"
    run_dir.mkdir(parents=True)
    records = []
    for step, loss, accuracy, margin in evals:
        records.append({"step": step, "loss": loss + 0.01, "grad_norm": 1.0, "seconds": 0.5})
        records.append(_eval_record(step, loss, accuracy, margin))
    if records:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if final is not None:
        (run_dir / "report.html").write_text("<html>the run's own report</html>")
        (run_dir / "run.json").write_text(json.dumps({"complete": True, "steps": point.pop("steps", 40),
                                                      "final_eval": final, "fingerprint": "ab" * 8}))
    return {"name": name, "overrides": point.pop("overrides", {}), "run_dir": str(run_dir),
            "state": point.pop("state", "finished" if final else "failed"), "wall_s": point.pop("wall_s", None)}


def _final(loss: float, accuracy: float, margin: float) -> dict:
    return {key: value for key, value in _eval_record(40, loss, accuracy, margin).items() if key != "step"}


@pytest.fixture
def sweep(tmp_path) -> list[dict]:
    """A failed point (no run.json), three finished ones whose accuracy, loss and margin rank them
    three different ways, and a running one with eval records but no run.json yet."""
    storage = tmp_path / "storage"
    return [
        make_point(storage, "failed", overrides={"train.beta": 0.01}),
        make_point(storage, "a", _final(0.50, 0.6, 0.3), overrides={"train.beta": 0.1},
                   evals=[(10, 0.68, 0.5, 0.0), (20, 0.6, 0.5, 0.1)]),
        make_point(storage, "b", _final(0.65, 0.8, 0.1), overrides={"train.beta": 0.2},
                   evals=[(10, 0.69, 0.55, 0.0), (20, 0.7, 0.6, 0.0)]),
        make_point(storage, "c", _final(0.55, 0.7, 0.9), overrides={"train.beta": 0.3},
                   evals=[(10, 0.66, 0.5, 0.2), (20, 0.6, 0.6, 0.5)]),
        make_point(storage, "running", overrides={"train.beta": 0.4}, evals=[(20, 0.4, 0.9, 2.0)], state="running"),
    ]


def _names(rows: list[dict]) -> list[str]:
    return [row["point"] for row in rows]


def test_metric_names_and_direction():
    assert metric_name("rewards/accuracies") == metric_name("eval/rewards/accuracies") == "eval/rewards/accuracies"
    assert metric_name("loss") == "eval/loss"
    assert lower_is_better("eval/loss") and lower_is_better("loss")
    assert not lower_is_better("eval/rewards/accuracies") and not lower_is_better("rewards/margins")
    assert DEFAULT_METRIC == "eval/rewards/accuracies"


def test_rows_best_first_by_the_metric_unfinished_last_in_their_order(sweep):
    # accuracy 0.8 > 0.7 > 0.6; the running point's better eval records do not count (no final value)
    assert _names(sweep_rows(sweep)) == ["b", "c", "a", "failed", "running"]
    # final loss 0.50 < 0.55 < 0.65, lowest first
    assert _names(sweep_rows(sweep, "eval/loss")) == _names(sweep_rows(sweep, "loss")) == [
        "a", "c", "b", "failed", "running"]
    # margin 0.9 > 0.3 > 0.1
    assert _names(sweep_rows(sweep, "rewards/margins")) == ["c", "a", "b", "failed", "running"]
    # the unfinished keep their given order whatever the metric
    assert _names(sweep_rows(list(reversed(sweep))))[-2:] == ["running", "failed"]


def test_a_run_without_the_metric_or_with_nan_ranks_as_unfinished(tmp_path):
    storage = tmp_path / "storage"
    points = [make_point(storage, "nan", _final(math.nan, 0.9, 0.2)), make_point(storage, "ok", _final(0.3, 0.5, 0.2)),
              make_point(storage, "no-final-eval", {})]
    assert _names(sweep_rows(points, "loss")) == ["ok", "nan", "no-final-eval"]
    assert _names(sweep_rows(points)) == ["nan", "ok", "no-final-eval"]  # its accuracy is a number
    assert sweep_rows(points, "loss")[1]["eval loss"] is None


def test_row_columns_and_values(tmp_path):
    storage = tmp_path / "storage"
    done = make_point(storage, "done", _final(0.6931471, 0.123456, -0.00049), steps=37, wall_s=12.36,
                      overrides={"train.beta": 0.1, "train.loss_type": "ipo"})
    failed = make_point(storage, "failed", overrides={"train.beta": 0.2, "train.loss_type": "sigmoid"},
                        state="failed", wall_s=3.0)
    rows = sweep_rows([done, failed])
    assert [list(row) for row in rows] == [["point", "train.beta", "train.loss_type", "state", "eval loss",
                                            "reward accuracy", "reward margin", "steps", "wall time (s)",
                                            "report"]] * 2
    assert rows[0] == {"point": "done", "train.beta": 0.1, "train.loss_type": "ipo", "state": "finished",
                       "eval loss": 0.6931, "reward accuracy": 0.1235, "reward margin": -0.0005,
                       "steps": 37, "wall time (s)": 12.4, "report": str(Path(done["run_dir"]) / "report.html")}
    assert rows[1] == {"point": "failed", "train.beta": 0.2, "train.loss_type": "sigmoid", "state": "failed",
                       "eval loss": None, "reward accuracy": None, "reward margin": None,
                       "steps": None, "wall time (s)": 3.0, "report": ""}
    # a point that lacks another's override key has None in that column
    other = make_point(storage, "other", overrides={"train.learning_rate": 1e-6})
    assert [row.get("train.learning_rate", "absent") for row in sweep_rows([done, other])] == [None, 1e-6]


class _Page(HTMLParser):
    """The report's table rows (each a list of its cells' text, and its class), links and images."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[tuple[str | None, list[str]]] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.title = ""
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append((attrs.get("class"), []))
        elif tag in ("td", "th"):
            self.rows[-1][1].append("")
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "img":
            self.images.append(attrs["src"])
        self._in_title = tag == "title"

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif self.rows and self.rows[-1][1]:
            self.rows[-1][1][-1] += data


def _pngs(page: _Page) -> list:
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in page.images)
    return [Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))).convert("RGB") for src in page.images]


def _has_colour(image, colour, tolerance: int = 30) -> bool:
    return any(sum(abs(a - b) for a, b in zip(c, colour)) < tolerance for _, c in image.getcolors(1 << 22))


def test_html_table_links_and_plots(sweep, tmp_path):
    sweep_dir = tmp_path / "storage" / "sweeps" / "beta"
    path = write_sweep_report(sweep_dir, "beta", sweep)
    assert path == sweep_dir / SWEEP_REPORT and path.is_file()
    page = _Page(path.read_text())
    assert page.title == "beta: DPO sweep"
    text = path.read_text()
    assert "5 points, 3 finished" in text and "eval/rewards/accuracies" in text
    header, *rows = page.rows
    assert header[1][:2] == ["point", "train.beta"] and "report" not in header[1]
    assert len(rows) == len(sweep)
    assert [cells[0] for _, cells in rows] == ["b", "c", "a", "failed", "running"]
    assert [css for css, _ in rows] == ["best", None, None, None, None]
    # the finished points link to their own report, by a path relative to the sweep's folder
    assert len(page.links) == 3
    for href, point in zip(page.links, [sweep[2], sweep[3], sweep[1]]):
        assert not os.path.isabs(href)
        target = os.path.normpath(os.path.join(sweep_dir, unquote(href)))
        assert target == os.path.normpath(Path(point["run_dir"]) / "report.html") and os.path.isfile(target)
    images = _pngs(page)
    assert len(images) == 3 and all(image.size[0] > 300 for image in images)


def test_links_still_resolve_when_storage_is_moved(sweep, tmp_path):
    write_sweep_report(tmp_path / "storage" / "sweeps" / "beta", "beta", sweep)
    moved = tmp_path / "elsewhere" / "storage"
    shutil.copytree(tmp_path / "storage", moved)
    shutil.rmtree(tmp_path / "storage")
    page = _Page((moved / "sweeps" / "beta" / SWEEP_REPORT).read_text())
    assert len(page.links) == 3
    assert all((moved / "sweeps" / "beta" / unquote(href)).is_file() for href in page.links)


def test_names_and_values_are_escaped(tmp_path):
    storage = tmp_path / "storage"
    points = [make_point(storage, "<b>bold</b>", _final(0.5, 0.7, 0.2), overrides={"train.<i>": "<b>x</b>"},
                         evals=[(10, 0.6, 0.6, 0.1)])]
    path = write_sweep_report(tmp_path / "sweep", "<script>", points)
    text = path.read_text()
    assert "<b>" not in text and "<i>" not in text and "<script>" not in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "&lt;b&gt;x&lt;/b&gt;" in text and "train.&lt;i&gt;" in text
    page = _Page(text)
    assert page.title == "<script>: DPO sweep"
    assert page.rows[1][1][:2] == ["<b>bold</b>", "<b>x</b>"]


def test_plots_draw_only_points_with_eval_records(tmp_path):
    storage = tmp_path / "storage"
    not_started = {"name": "not-started", "overrides": {}, "run_dir": str(storage / "runs" / "never"),
                   "state": "not started", "wall_s": None}
    no_evals = make_point(storage, "no-evals", state="running")
    # no eval record anywhere: the three panels still render, empty
    empty = _pngs(_Page(write_sweep_report(tmp_path / "s1", "s1", [not_started, no_evals]).read_text()))
    assert len(empty) == 3 and not any(_has_colour(image, BLUE) for image in empty)
    # one run with eval records: its line (the first colour) is on each panel
    evaluated = make_point(storage, "evaluated", evals=[(10, 0.6, 0.5, 0.1), (20, 0.5, 0.7, 0.4)], state="running")
    drawn = _pngs(_Page(write_sweep_report(tmp_path / "s2", "s2", [not_started, no_evals, evaluated]).read_text()))
    assert len(drawn) == 3 and all(_has_colour(image, BLUE) for image in drawn)


def test_a_sort_metric_outside_the_table_gets_its_column_and_plot(sweep, tmp_path):
    """Sorted by eval/rewards/chosen (margin / 2 in these runs): the table shows that metric too,
    and the report plots it; the three usual columns stay."""
    rows = sweep_rows(sweep, "rewards/chosen")
    assert _names(rows) == ["c", "a", "b", "failed", "running"]
    assert [row["eval/rewards/chosen"] for row in rows] == [0.45, 0.15, 0.05, None, None]
    assert list(rows[0])[-4:] == ["eval/rewards/chosen", "steps", "wall time (s)", "report"]
    assert "eval/rewards/chosen" not in sweep_rows(sweep)[0]  # sorted by a shown metric: no extra column
    page = _Page(write_sweep_report(tmp_path / "sweeps" / "chosen", "chosen", sweep, "rewards/chosen").read_text())
    assert "eval/rewards/chosen" in page.rows[0][1]
    assert len(_pngs(page)) == 4
