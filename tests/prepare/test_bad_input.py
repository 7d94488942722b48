"""Bad input never ends in a traceback (issue 9 §2).

Each case ends either in a clean user error (DataError / PrepareError) that names the file and
says what to do, or in a reject with its reason and source row: every row read lands in
examples.parquet or rejects.parquet.
"""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from pipeline.errors import DataError
from pipeline.prepare.records import REJECT_REASONS
from pipeline.prepare.stage import prepare

from tests.conftest import write_jsonl


def good_rows(n=6):
    return [{"prompt": f"Question {i}?", "chosen": f" Yes {i}.", "rejected": f" No {i}."} for i in range(n)]


def run(make_config, path, **sections):
    sections.setdefault("data", {}).setdefault("max_reject_fraction", 1.0)
    return prepare(make_config(path, **sections), show_progress=False)


def outcome(result):
    """{source_row: "kept" or the reject reason}, checking that nothing was lost."""
    examples = pq.read_table(result.output_dir / "examples.parquet").to_pylist()
    rejects = pq.read_table(result.output_dir / "rejects.parquet").to_pylist()
    rows = {ex["source_row"]: "kept" for ex in examples}
    for r in rejects:
        assert r["source_row"] not in rows
        rows[r["source_row"]] = r["reason"]
    assert len(rows) == result.manifest["counts"]["rows_read"]
    return rows, {r["source_row"]: r for r in rejects}


# --- JSONL rows --------------------------------------------------------------------------------


def test_lone_surrogate_is_a_reject_not_a_crash(tmp_path, make_config):
    # The JSON escape \ud800 is valid JSON syntax but no Unicode text: it cannot be hashed,
    # tokenized or written to Parquet.
    lines = [*map(json.dumps, good_rows(2)),
             '{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}',
             '{"prompt": "fine", "chosen": "\\udfff tail", "rejected": "b"}',
             '{"prompt": "pair \\ud83d\\ude00", "chosen": "a", "rejected": "b"}']
    rows, rejects = outcome(run(make_config, write_jsonl(tmp_path / "d.jsonl", lines)))
    assert rows == {0: "kept", 1: "kept", 2: "malformed_json", 3: "malformed_json", 4: "kept"}
    assert "surrogate" in rejects[2]["detail"] and "prompt" in rejects[2]["detail"]
    assert "chosen" in rejects[3]["detail"]
    assert rejects[2]["raw"] == lines[2]


def test_deeply_nested_json_is_malformed_json(tmp_path, make_config):
    deep = 100_000
    lines = [json.dumps(good_rows(1)[0]),
             "[" * deep + "]" * deep,
             '{"prompt": ' + "[" * deep + "]" * deep + ', "chosen": "a", "rejected": "b"}',
             json.dumps(good_rows(2)[1])]
    rows, rejects = outcome(run(make_config, write_jsonl(tmp_path / "d.jsonl", lines)))
    assert rows == {0: "kept", 1: "malformed_json", 2: "malformed_json", 3: "kept"}
    assert "nested" in rejects[1]["detail"]


def test_utf8_bom_at_file_start_is_not_part_of_the_first_row(tmp_path, make_config):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in good_rows(3)).encode())
    rows, _ = outcome(run(make_config, path))
    assert rows == {0: "kept", 1: "kept", 2: "kept"}
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    rows, _ = outcome(run(make_config, gz))
    assert rows == {0: "kept", 1: "kept", 2: "kept"}


def test_row_above_max_row_bytes_is_rejected_before_tokenizing(tmp_path, make_config):
    assert "row_too_large" in REJECT_REASONS
    big = {"prompt": "word " * 400, "chosen": "a", "rejected": "b"}
    lines = [*good_rows(2), big, good_rows(3)[2]]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    rows, rejects = outcome(run(make_config, path, data={"max_row_bytes": 1000}))
    assert rows == {0: "kept", 1: "kept", 2: "row_too_large", 3: "kept"}
    assert "data.max_row_bytes" in rejects[2]["detail"] and str(len(json.dumps(big))) in rejects[2]["detail"]
    assert rejects[2]["raw"] == json.dumps(big)  # nothing lost: the whole row is in rejects
    # Under a larger limit the same row is kept (it only needed truncation).
    other = write_jsonl(tmp_path / "d2.jsonl", [*lines, good_rows(5)[4]])
    rows, _ = outcome(run(make_config, other, data={"max_row_bytes": 10_000}))
    assert rows == {0: "kept", 1: "kept", 2: "kept", 3: "kept", 4: "kept"}


def test_max_row_bytes_is_part_of_the_dataset_fingerprint(tmp_path, make_config):
    path = write_jsonl(tmp_path / "d.jsonl", good_rows(3))
    a = run(make_config, path, data={"max_row_bytes": 1000})
    b = run(make_config, path, data={"max_row_bytes": 2000})
    assert a.output_dir != b.output_dir


def test_row_size_limit_applies_to_parquet_rows(tmp_path, make_config):
    rows_in = [*good_rows(2), {"prompt": "x" * 5000, "chosen": "a", "rejected": "b"}]
    pq.write_table(pa.Table.from_pylist(rows_in), tmp_path / "d.parquet")
    rows, _ = outcome(run(make_config, tmp_path / "d.parquet", data={"max_row_bytes": 1000}))
    assert rows == {0: "kept", 1: "kept", 2: "row_too_large"}


# --- damaged files: a clean DataError naming the file ---------------------------------------------


def gz_lines(n=3000):
    rows = [{"prompt": f"Question {i} " + "pad " * 20, "chosen": f" Yes {i}.", "rejected": f" No {i}."}
            for i in range(n)]
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:-8], id="no-trailer"),
        pytest.param(lambda b: b[:2000] + bytes(200) + b[2200:], id="corrupt-deflate"),
        pytest.param(lambda b: b[:-8] + b"\x00" * 8, id="bad-crc"),
        pytest.param(lambda b: b"not gzip at all\n" * 10, id="not-gzip"),
    ],
)
def test_damaged_gzip_is_a_data_error_naming_the_file(tmp_path, make_config, damage):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(damage(gz_lines()))
    with pytest.raises(DataError) as err:
        run(make_config, path)
    message = str(err.value)
    assert str(path) in message
    assert "line" in message  # how far it got
    assert "gzip" in message


def test_truncated_gzip_message_says_how_far_it_got(tmp_path, make_config):
    path = tmp_path / "d.jsonl.gz"
    data = gz_lines()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"after \d+ complete lines") as err:
        run(make_config, path)
    lines_ok = int(str(err.value).split("after ")[1].split()[0])
    assert 0 < lines_ok < 3000


@pytest.mark.parametrize("content", [b"PAR1 not really", b"hello world, no parquet here" * 50, "truncate"])
def test_bad_parquet_is_a_data_error(tmp_path, make_config, content):
    path = tmp_path / "d.parquet"
    if content == "truncate":
        pq.write_table(pa.Table.from_pylist(good_rows(50)), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 40])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match="Parquet") as err:
        run(make_config, path)
    assert str(path) in str(err.value)


def test_unused_timestamp_ns_column_does_not_fail(tmp_path, make_config):
    rows_in = good_rows(4)
    table = pa.Table.from_pylist(rows_in).append_column(
        "created", pa.array([1_700_000_000_123_456_789 + i for i in range(4)], pa.timestamp("ns"))
    )
    pq.write_table(table, tmp_path / "d.parquet")
    result = run(make_config, tmp_path / "d.parquet")
    rows, _ = outcome(result)
    assert rows == {i: "kept" for i in range(4)}
    examples = pq.read_table(result.output_dir / "examples.parquet").to_pylist()
    assert [ex["prompt"] for ex in examples] == [r["prompt"] for r in rows_in]


def _datasets_folder(tmp_path, state: str | None, write_arrow: bool | bytes = True):
    folder = tmp_path / "hf"
    folder.mkdir()
    table = pa.Table.from_pylist(good_rows(4))
    if write_arrow is True:
        with ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as writer:
            writer.write_table(table)
    elif write_arrow:
        (folder / "data-00000-of-00001.arrow").write_bytes(write_arrow)
    (folder / "state.json").write_text(state)
    return folder


GOOD_STATE = json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})


@pytest.mark.parametrize(
    "state, arrow, expect",
    [
        ("{not json", True, "state.json"),
        ("[1, 2]", True, "state.json"),
        (json.dumps({"_fingerprint": "x"}), True, "_data_files"),
        (json.dumps({"_data_files": [{"name": "x.arrow"}]}), True, "filename"),
        (json.dumps({"_data_files": "data.arrow"}), True, "_data_files"),
        (GOOD_STATE, False, "data-00000-of-00001.arrow"),
        (GOOD_STATE, b"garbage, not arrow" * 10, "data-00000-of-00001.arrow"),
        (json.dumps({"_data_files": [{"filename": "../../etc/passwd"}]}), True, "filename"),
    ],
    ids=["invalid-json", "not-an-object", "no-data-files", "no-filename", "files-not-a-list",
         "missing-arrow", "garbage-arrow", "escaping-path"],
)
def test_broken_datasets_folder_is_a_data_error(tmp_path, make_config, state, arrow, expect):
    folder = _datasets_folder(tmp_path, state, arrow)
    with pytest.raises(DataError) as err:
        run(make_config, folder)
    assert expect in str(err.value) and str(folder) in str(err.value)


def test_good_datasets_folder_still_reads(tmp_path, make_config):
    rows, _ = outcome(run(make_config, _datasets_folder(tmp_path, GOOD_STATE)))
    assert rows == {i: "kept" for i in range(4)}


# --- issue 20 §4: an input without rows says so -----------------------------------------------------


def _empty_parquet(path):
    pq.write_table(pa.Table.from_pylist(good_rows(1)).slice(0, 0), path)


@pytest.mark.parametrize("name, write, why", [
    ("d.jsonl", lambda p: p.write_bytes(b""), "an empty file: 0 bytes"),
    ("d.jsonl", lambda p: p.write_bytes(b"\n  \n\r\n\t\n"), "blank lines only"),
    ("d.jsonl", lambda p: p.write_bytes(b"\xef\xbb\xbf\n"), "blank lines only"),
    ("d.jsonl.gz", lambda p: p.write_bytes(b""), "an empty file: 0 bytes"),
    ("d.jsonl.gz", lambda p: p.write_bytes(gzip.compress(b"")), "no lines, or blank lines only"),
    ("d.parquet", lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    ("d.parquet", _empty_parquet, "a Parquet file of 0 rows"),
], ids=["jsonl-0-bytes", "jsonl-blank-lines", "jsonl-bom-only", "gz-0-bytes", "gz-empty-stream",
        "parquet-0-bytes", "parquet-0-rows"])
def test_an_empty_data_file_says_it_has_no_rows(tmp_path, make_config, name, write, why):
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as err:
        run(make_config, path)
    message = str(err.value)
    assert str(path) in message and "has no rows" in message and why in message, message
    assert "cannot tell the data format" not in message


def test_an_empty_datasets_folder_and_empty_glob_files_say_they_have_no_rows(tmp_path, make_config):
    folder = tmp_path / "hf"
    folder.mkdir()
    with ipc.new_stream(folder / "data-00000-of-00001.arrow", pa.Table.from_pylist(good_rows(1)).schema):
        pass
    (folder / "state.json").write_text(GOOD_STATE)
    with pytest.raises(DataError, match=r"has no rows \(a `datasets` folder of 0 rows\)"):
        run(make_config, folder)
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(2):
        (parts / f"part-{i}.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"data\.path .*part-\*\.jsonl \(2 files\) has no rows \(every file is empty"):
        run(make_config, parts / "part-*.jsonl")
    (parts / "part-1.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"\(2 files\) has no rows \(not one in its files\)"):
        run(make_config, parts / "part-*.jsonl")
    # one empty file among files with rows is no error: its rows are none of the rows read
    write_jsonl(parts / "part-2.jsonl", good_rows(2))
    rows, _ = outcome(run(make_config, parts / "part-*.jsonl"))
    assert rows == {0: "kept", 1: "kept"}
