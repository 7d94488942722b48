"""Reading preference data: JSONL (optionally gzipped), Parquet, or a `datasets` save_to_disk folder.

Readers yield ``RawRow``s in file order. A row that cannot be parsed is still yielded (with
``error`` set) so that the prepare stage can account for it in the rejects file: every row read
ends up either used or rejected, never dropped.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from .store import fingerprint, sha256_file


class DataError(ValueError):
    """The input cannot be read at all (missing file, unknown type); says what to do."""


@dataclass
class RawRow:
    source_row: int
    """0-based position in the input: the line index for JSONL (blank lines count), else the row."""
    raw: str
    """The record as read: the JSONL line, or the canonical JSON of a Parquet/Arrow row."""
    record: dict | None
    error: str | None = None
    """Reason code when the row could not be parsed: malformed_json or not_an_object."""
    detail: str = ""


def input_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "state.json").is_file():
            return "datasets"
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            raise DataError(
                f"{path} is a DatasetDict with splits {splits}: point data.path at one split's "
                f"folder, e.g. {path / (splits[0] if splits else 'train')}"
            )
        raise DataError(
            f"{path} is a folder but not a `datasets` save_to_disk folder (no state.json): "
            "point data.path at a .jsonl, .jsonl.gz or .parquet file"
        )
    name = path.name.lower()
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith((".jsonl.gz", ".json.gz")):
        return "jsonl.gz"
    if name.endswith(".parquet"):
        return "parquet"
    raise DataError(
        f"{path}: unsupported file type; use .jsonl, .jsonl.gz, .parquet or a `datasets` folder"
    )


def check_input(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data.path {path} does not exist: set data.path to your preference data")
    input_kind(path)
    return path


def _datasets_files(path: Path) -> list[Path]:
    state = json.loads((path / "state.json").read_text())
    return [path / item["filename"] for item in state.get("_data_files", [])]


def input_sha256(path: str | Path) -> str:
    """Content hash of the input: the file's bytes, or for a `datasets` folder its data files."""
    path = Path(path)
    if input_kind(path) == "datasets":
        parts = [sha256_file(f) for f in _datasets_files(path)]
        return fingerprint(parts)
    return sha256_file(path)


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _jsonl_rows(path: Path, opener) -> Iterator[RawRow]:
    with opener(path, "rb") as fh:
        for index, line in enumerate(fh):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raw = line.decode("utf-8", errors="replace").rstrip("\r\n")
                yield RawRow(index, raw, None, "malformed_json", f"not UTF-8: {exc}")
                continue
            text = text.rstrip("\r\n")
            if not text.strip():
                continue  # blank lines are not rows
            try:
                record = json.loads(text)
            except ValueError as exc:
                yield RawRow(index, text, None, "malformed_json", str(exc))
                continue
            if not isinstance(record, dict):
                yield RawRow(index, text, None, "not_an_object", f"a JSON {type(record).__name__}")
                continue
            yield RawRow(index, text, record)


def _table_rows(batches: Iterator[pa.RecordBatch]) -> Iterator[RawRow]:
    index = 0
    for batch in batches:
        for record in batch.to_pylist():
            raw = json.dumps(record, sort_keys=True, ensure_ascii=False, default=_json_default)
            yield RawRow(index, raw, record)
            index += 1


def _arrow_batches(files: list[Path]) -> Iterator[pa.RecordBatch]:
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                reader = ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
                continue
            yield from reader


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """All rows of the input, in order, parsed or not."""
    path = Path(path)
    kind = input_kind(path)
    if kind == "jsonl":
        return _jsonl_rows(path, open)
    if kind == "jsonl.gz":
        return _jsonl_rows(path, gzip.open)
    if kind == "parquet":
        return _table_rows(pq.ParquetFile(path).iter_batches(batch_size=4096))
    return _table_rows(_arrow_batches(_datasets_files(path)))


__all__ = ["DataError", "RawRow", "check_input", "input_sha256", "read_rows"]
