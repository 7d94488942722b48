"""report.html of a hyper-parameter sweep: its points side by side, best first, with each run's eval curves.

    points = [{"name": "beta-0.1", "overrides": {"train.beta": 0.1}, "run_dir": "storage/runs/beta-0.1",
               "state": "finished", "wall_s": 812.4}, ...]
    rows = sweep_rows(points, metric="eval/loss")           # the table, lowest eval loss first
    write_sweep_report("storage/sweeps/beta", "beta", points)   # storage/sweeps/beta/report.html

A point is a training run folder (runs/<name>/): its run.json, once complete, gives the final eval
numbers and the step count; its metrics.jsonl the eval curves, also while it trains. A point not
finished (failed, still running, not started) has no final value and comes last in the table; one
without an eval record yet is absent from the plots. Each point's name links to its own report.html
by a path relative to the sweep's folder, so storage can be moved. One self-contained file (PNGs
embedded, no JavaScript), written atomically: a browser reloading it during the sweep never sees
half a page.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from urllib.parse import quote

from pipeline.reports.run_report import REPORT, png_base64
from pipeline.storage import metrics
from pipeline.storage.paths import RUN_SUMMARY
from pipeline.store import atomic_write_text, ensure_dir, read_json

SWEEP_REPORT = "report.html"
DEFAULT_METRIC = "eval/rewards/accuracies"
NUMBER_COLUMNS = (
    ("eval loss", "eval/loss"),
    ("reward accuracy", "eval/rewards/accuracies"),
    ("reward margin", "eval/rewards/margins"),
)
"""The table's columns of final eval numbers (run.json's final_eval): (column, metric)."""
PANELS = (
    ("Eval loss", "eval/loss"),
    ("Eval reward accuracy", "eval/rewards/accuracies"),
    ("Eval reward margin (chosen - rejected)", "eval/rewards/margins"),
)
"""One plot per eval metric, a line per run: (title, metric)."""
LINE_STYLES = ("-", "--", ":", "-.")  # after matplotlib's 10 colours, the same colours dashed
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
         "td:first-child,th:first-child{text-align:left}tr.best td{background:#e3f4e1;font-weight:bold}"
         "img{display:block;margin:1em 0;max-width:100%}")


def metric_name(metric: str) -> str:
    """'rewards/accuracies' or 'eval/rewards/accuracies' -> 'eval/rewards/accuracies'."""
    return metric if metric.startswith("eval/") else f"eval/{metric}"


def lower_is_better(metric: str) -> bool:
    """True for a loss (the lower the better); False for the rest (rewards, accuracies, log-probs)."""
    return "loss" in metric


def _summary(run_dir: str | Path) -> dict | None:
    """The run's run.json when the run is complete, else None (failed, running, not started)."""
    summary = read_json(Path(run_dir) / RUN_SUMMARY)
    return summary if summary and summary.get("complete") is True else None


def _final(summary: dict | None, metric: str) -> float | None:
    """The run's final eval value of ``metric``; None when absent or not a finite number (a diverged
    run's NaN ranks with the unfinished ones, never as the best)."""
    final = (summary or {}).get("final_eval")
    value = final.get(metric) if isinstance(final, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _ordered(points: list[dict], metric: str) -> list[tuple[dict, dict | None]]:
    """(point, its complete run.json or None), best first by ``metric``; the points without a final
    value last, in their given order."""
    metric = metric_name(metric)
    sign = 1 if lower_is_better(metric) else -1
    pairs = [(point, _summary(point["run_dir"])) for point in points]
    valued = [pair for pair in pairs if _final(pair[1], metric) is not None]
    rest = [pair for pair in pairs if _final(pair[1], metric) is None]
    return sorted(valued, key=lambda pair: sign * _final(pair[1], metric)) + rest


def _rounded(value, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def _override_keys(points: list[dict]) -> list[str]:
    """Every point's override keys, in the order first met (a sweep's points usually share them)."""
    return list(dict.fromkeys(key for point in points for key in point.get("overrides", {})))


def _with_metric(known: tuple[tuple[str, str], ...], metric: str, label: str) -> tuple[tuple[str, str], ...]:
    """``known`` (label, metric) pairs, and (``label``, the sort metric) when it is none of them."""
    return known if any(metric == m for _, m in known) else (*known, (label, metric))


def _number_columns(metric: str) -> tuple[tuple[str, str], ...]:
    """NUMBER_COLUMNS, and the sort metric (named as it is) when it is none of them."""
    metric = metric_name(metric)
    return _with_metric(NUMBER_COLUMNS, metric, metric)


def _row(point: dict, summary: dict | None, keys: list[str], columns: tuple[tuple[str, str], ...]) -> dict:
    row: dict = {"point": point["name"]}
    row.update({key: point.get("overrides", {}).get(key) for key in keys})
    row["state"] = point.get("state", "")
    row.update({column: _rounded(_final(summary, metric), 4) for column, metric in columns})
    steps = (summary or {}).get("steps")
    row["steps"] = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
    row["wall time (s)"] = _rounded(point.get("wall_s"), 1)
    report = Path(point["run_dir"]) / REPORT
    row["report"] = str(report) if report.is_file() else ""
    return row


def sweep_rows(points: list[dict], metric: str = DEFAULT_METRIC) -> list[dict]:
    """One row per point, sorted best first by ``metric`` (descending; ascending when
    lower_is_better); points without a final value of the metric (unfinished, failed, not started)
    come last, in their given order. Each point: {"name", "overrides": {dotted key: value},
    "run_dir", "state", "wall_s": float or None}.

    Row keys, in order: "point", each override key (value as given; None where a point lacks it),
    "state", "eval loss", "reward accuracy", "reward margin", the metric itself when it is none of
    those three (e.g. "eval/logps/chosen"), "steps", "wall time (s)", "report"
    (the run's report.html path, "" when there is none). Missing numbers are None; numbers are
    rounded to 4 decimals, wall time to 1."""
    return _rows(points, _ordered(points, metric), metric)


def _rows(points: list[dict], ordered: list[tuple[dict, dict | None]], metric: str) -> list[dict]:
    keys, columns = _override_keys(points), _number_columns(metric)
    return [_row(point, summary, keys, columns) for point, summary in ordered]


def _eval_series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[metric]) for r in records if "step" in r and metric in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _plots(points: list[dict], metric: str) -> list[tuple[str, str]]:
    """(title, base64 PNG) per PANELS metric (and the sort metric when it is none of them): a line
    per point with eval records, in the given order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(point["name"], metrics.read(metrics.path_of(point["run_dir"]))) for point in points]
    images = []
    panels = _with_metric(PANELS, metric, f"Eval {metric.removeprefix('eval/')}")
    for title, panel_metric in panels:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        drawn = 0
        for name, records in runs:
            steps, values = _eval_series(records, panel_metric)
            if steps:
                style = LINE_STYLES[drawn // 10 % len(LINE_STYLES)]
                ax.plot(steps, values, marker="o", linestyle=style, label=name, linewidth=1.6, markersize=4)
                drawn += 1
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="best", fontsize=8)
        images.append((title, png_base64(fig)))
        plt.close(fig)
    return images


def _cell(value) -> str:
    return "<td></td>" if value is None else f"<td>{html.escape(str(value))}</td>"


def _table(rows: list[dict], sweep_dir: Path, best: bool) -> list[str]:
    """The rows as an HTML table, without the report column: each point's name links to its report
    by a relative path instead. ``best``: highlight the first row."""
    esc = html.escape
    columns = [column for column in rows[0] if column != "report"] if rows else ["point"]
    parts = ["<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>"]
    for i, row in enumerate(rows):
        name = esc(str(row["point"]))
        if row["report"]:
            href = quote(Path(os.path.relpath(row["report"], sweep_dir)).as_posix())
            name = f"<a href='{esc(href)}'>{name}</a>"
        css = " class='best'" if best and i == 0 else ""
        parts.append(f"<tr{css}><td>{name}</td>" + "".join(_cell(row[c]) for c in columns[1:]) + "</tr>")
    parts.append("</table>")
    return parts


def write_sweep_report(sweep_dir: str | Path, name: str, points: list[dict], metric: str = DEFAULT_METRIC) -> Path:
    """Write <sweep_dir>/report.html (atomically) and return its path: how many points and finished,
    the table of sweep_rows best first (the best highlighted; names link to the runs' reports), and
    a plot per eval metric with a line per run."""
    sweep_dir = Path(sweep_dir)
    esc = html.escape
    metric = metric_name(metric)
    ordered = _ordered(points, metric)
    rows = _rows(points, ordered, metric)
    finished = sum(summary is not None for _, summary in ordered)
    has_best = bool(ordered) and _final(ordered[0][1], metric) is not None
    order = "lowest" if lower_is_better(metric) else "highest"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(name)}: DPO sweep</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(name)}: DPO sweep</h1>",
        f"<p>{len(points)} points, {finished} finished; sorted by final {esc(metric)}, {order} first "
        "(points without a final value last).</p>",
        *_table(rows, sweep_dir, has_best),
        "<h2>Eval curves</h2>",
    ]
    for title, data in _plots([point for point, _ in ordered], metric):
        parts.append(f"<img alt='{esc(title)}' title='{esc(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    path = ensure_dir(sweep_dir) / SWEEP_REPORT
    atomic_write_text(path, "\n".join(parts))
    return path
