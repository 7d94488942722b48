"""pipeline/storage/metrics.py, a run's metrics.jsonl: append, read (a line cut by a kill skipped), truncate to a step."""

from __future__ import annotations

from pipeline.storage import metrics, paths


def test_append_read_and_truncate(tmp_path):
    path = metrics.path_of(tmp_path)
    assert path == tmp_path / paths.METRICS
    assert metrics.read(path) == []
    records = [{"step": 0, "eval/loss": 0.69}, {"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}]
    for record in records:
        metrics.append(path, record)
    assert metrics.read(path) == records
    assert path.read_text().splitlines()[1] == '{"loss": 0.7, "step": 1}'  # keys sorted: the same bytes every run
    metrics.truncate(path, 1)
    assert metrics.read(path) == records[:2]


def test_a_line_cut_by_a_kill(tmp_path):
    """A kill mid-write leaves the last line cut short: `dpo status` reads the lines before it, and
    a resume (truncate to its checkpoint's step, always earlier) drops it."""
    path = metrics.path_of(tmp_path)
    for step in (1, 2):
        metrics.append(path, {"step": step, "loss": 0.5})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"loss": 0.4, "st')
    assert [r["step"] for r in metrics.read(path)] == [1, 2]
    metrics.truncate(path, 2)
    assert path.read_text() == '{"loss": 0.5, "step": 1}\n{"loss": 0.5, "step": 2}\n'
