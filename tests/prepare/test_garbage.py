"""Property-based garbage input: prepare never crashes and every row lands in examples or rejects."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config.load import config_from_dict
from pipeline.errors import DataError, PrepareError
from pipeline.prepare.stage import prepare

text = st.text(max_size=30)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": text}),
    st.dictionaries(st.sampled_from(["role", "content", "x"]), scalar, max_size=3),
    scalar,
)
field = st.one_of(scalar, st.lists(message, max_size=3), st.dictionaries(text, scalar, max_size=2))
record = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "other"]), field, max_size=4)
# Lines: plain garbage, JSON that is not an object, or an object with random fields.
line = st.one_of(
    text.filter(lambda s: "\n" not in s and "\r" not in s),
    st.lists(scalar, max_size=3).map(json.dumps),
    record.map(json.dumps),
    st.builds(lambda p, c, r: json.dumps({"prompt": p, "chosen": c, "rejected": r}), text, text, text),
    # Valid JSON that is no text, JSON nested too deeply to parse, an oversized row.
    st.sampled_from([
        '{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}',
        '{"prompt": "p", "chosen": ["\\udfff"], "rejected": "b"}',
        "[" * 100_000 + "]" * 100_000,
        '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
        json.dumps({"prompt": "p " * 3000, "chosen": "a", "rejected": "b"}),
    ]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, min_size=1, max_size=25), fmt=st.sampled_from(["auto", "standard", "conversational", "implicit"]))
def test_garbage_never_crashes_and_nothing_is_lost(demo_assets, lines, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "garbage.jsonl"
        body = "\n".join(lines) + "\n"
        path.write_text(body, encoding="utf-8")
        # Count rows as the reader must: every line that is not blank.
        with open(path, "rb") as fh:
            expected_rows = sum(1 for raw in fh if raw.decode("utf-8", "replace").rstrip("\r\n").strip())
        cfg = config_from_dict(
            {
                "storage": str(Path(tmp) / "storage"),
                "data": {"path": str(path), "format": fmt, "max_reject_fraction": 1.0,
                         "max_row_bytes": 4096},
                "model": {"path": str(demo_assets["model"])},
                "tokenize": {"max_length": 64, "max_prompt_length": 32},
            }
        )
        try:
            result = prepare(cfg, show_progress=False)
        except (PrepareError, DataError) as exc:
            # The only refusals allowed: nothing to work with at all.
            assert "cannot tell the data format" in str(exc) or "has no rows" in str(exc)
            return
        counts = result.manifest["counts"]
        assert counts["rows_read"] == expected_rows
        examples = pq.read_table(result.output_dir / "examples.parquet")
        rejects = pq.read_table(result.output_dir / "rejects.parquet")
        assert examples.num_rows == counts["kept"] and rejects.num_rows == counts["rejected"]
        rows = examples.column("source_row").to_pylist() + rejects.column("source_row").to_pylist()
        assert len(rows) == len(set(rows)) == expected_rows
        assert all(reason for reason in rejects.column("reason").to_pylist())
        for ex in examples.to_pylist():
            assert ex["chosen_ids"] and ex["rejected_ids"]
            assert len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= 64
