"""Reading preference data: JSONL (optionally gzipped), Parquet, or a `datasets` save_to_disk folder.

Readers yield ``RawRow``s in file order. A row that cannot be parsed is still yielded (with
``error`` set) so that the prepare stage can account for it in the rejects file: every row read
ends up either used or rejected, never dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline.config.schema import is_hub_id
from pipeline.errors import DataError
from pipeline.store import fingerprint, sha256_file


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
                f"{path} is a DatasetDict with splits {splits}", hint="point data.path at one split's "
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


def resolve_input(data_cfg, storage: str | Path) -> Path:
    """The local input of ``data.path``: the path itself, or for a Hub dataset id the split
    read with ``datasets.load_dataset`` from the repository's snapshot in the local Hugging Face
    cache (HF_HOME, HF_HUB_OFFLINE, the usual token; downloaded when missing and online) and
    saved once as a `datasets` folder under <storage>/hub/datasets/ (per commit, config, folder
    and split), which the readers below then read like any `datasets` folder."""
    if not is_hub_id(data_cfg.path):
        for key in ("name", "data_dir", "revision"):
            if getattr(data_cfg, key):
                raise DataError(f"data.{key} applies to a Hub dataset id, but data.path {data_cfg.path} is local: "
                                f"remove data.{key}")
        return Path(data_cfg.path)
    return hub_dataset(str(data_cfg.path), data_cfg.name, data_cfg.data_dir, data_cfg.split, data_cfg.revision,
                       str(storage))


def hub_source(data_cfg, storage: str | Path) -> dict | None:
    """For a Hub dataset: what was read (id, config, folder, split, revision asked, commit)."""
    if not is_hub_id(data_cfg.path):
        return None
    folder = resolve_input(data_cfg, storage)
    return {"hub_id": str(data_cfg.path), "name": data_cfg.name, "data_dir": data_cfg.data_dir,
            "split": data_cfg.split, "revision": data_cfg.revision, "commit": folder.parts[-4]}


@functools.lru_cache(maxsize=None)
def hub_dataset(repo_id: str, name: str | None, data_dir: str | None, split: str, revision: str | None,
                storage: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        snapshot = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision))
    except RevisionNotFoundError:
        raise DataError(f"the Hub dataset {repo_id} has no revision {revision!r}", hint="set data.revision") from None
    except RepositoryNotFoundError:
        raise DataError(f"no dataset {repo_id} on the Hub (or it is private or gated: log in with `hf auth "
                        "login` or set HF_TOKEN); for a local file, check data.path") from None
    except LocalEntryNotFoundError:
        raise DataError(
            f"the dataset {shown} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
            f"cannot be reached (HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}, or no network)", hint="download it "
            f"where there is network with `hf download {repo_id} --repo-type dataset` into the same cache "
            "(HF_HOME), or point data.path at a local file"
        ) from None
    parts = [repo_id.replace("/", "--"), snapshot.name, name or "default", (data_dir or "all").replace("/", "--"), split]
    target = Path(storage, "hub", "datasets", *parts)
    if (target / "state.json").is_file():
        return target
    from pipeline.store import exclusive, lock_path

    with exclusive(lock_path(storage, "hub", "--".join(parts)), f"Hub dataset {shown} ({split})", wait=True):
        if not (target / "state.json").is_file():
            import datasets

            try:
                table = datasets.load_dataset(str(snapshot), name=name, data_dir=data_dir, split=split)
            except ValueError as exc:  # unknown split or config: datasets says which exist
                raise DataError(f"cannot read {shown} (data.name={name}, data.data_dir={data_dir}, "
                                f"data.split={split}): {exc}") from None
            tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            table.save_to_disk(str(tmp))
            os.replace(tmp, target)
    return target


def is_pattern(path: str | Path) -> bool:
    """Whether data.path is a glob pattern (several files), e.g. data/part-*.jsonl.gz."""
    return any(char in str(path) for char in "*?[")


def input_files(path: str | Path) -> list[Path]:
    """The files of data.path: the path itself, or the files a glob pattern matches, sorted
    (rows are read file after file in that order)."""
    if not is_pattern(path):
        return [Path(path)]
    files = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    if not files:
        raise DataError(f"data.path {path} matches no file", hint="check the pattern (e.g. data/train-*.jsonl)")
    return files


def check_input(path: str | Path) -> Path:
    """``path`` (a file, a `datasets` folder or a glob pattern of either), after checking that
    everything it names exists and is of one readable kind."""
    kinds = set()
    files = input_files(path)
    empty = []
    for file in files:
        if not file.exists():
            raise DataError(f"data.path {file} does not exist", hint="set data.path to your preference data")
        kinds.add(input_kind(file))
        if kinds == {"datasets"}:
            _datasets_files(file)  # a broken state.json or a missing data file fails here, early
        if file.is_file() and file.stat().st_size == 0:
            empty.append(file)
            if input_kind(file) == "parquet":  # not even a Parquet footer
                raise DataError(f"{file} is empty (0 bytes): it has no rows, and is not a Parquet file. "
                                "Write the preference data to it, or point data.path at another file")
    if empty and len(empty) == len(files):
        why = "an empty file: 0 bytes" if len(files) == 1 else "every file is empty: 0 bytes"
        raise DataError(_no_rows(path, files, why))
    if len(kinds) > 1:
        raise DataError(f"data.path {path} matches files of different kinds ({', '.join(sorted(kinds))}): "
                        "narrow the pattern to one kind (e.g. *.jsonl)")
    return Path(path)


def _datasets_files(path: Path) -> list[Path]:
    """The Arrow files a `datasets` save_to_disk folder lists in its state.json, all present."""
    state_path = path / "state.json"
    again = "save the dataset again with `save_to_disk`, or export it to .jsonl or .parquet"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{state_path} cannot be read as JSON ({exc}): {again}") from None
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(state, dict) or not isinstance(files, list) or not files:
        raise DataError(
            f"{state_path} does not list the data files (a non-empty \"_data_files\" list of "
            f"{{\"filename\": ...}} entries): {again}"
        )
    paths = []
    for i, item in enumerate(files):
        name = item.get("filename") if isinstance(item, dict) else None
        # A plain file name inside the folder, as save_to_disk writes it; nothing outside it.
        if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name:
            raise DataError(
                f"{state_path}: _data_files[{i}] has no usable \"filename\" (a file name in "
                f"{path}), got {item!r}: {again}"
            )
        file = path / name
        if not file.is_file():
            raise DataError(f"{file} is listed in {state_path} but does not exist: {again}")
        paths.append(file)
    return paths


def input_sha256(path: str | Path) -> str:
    """Content hash of the input: the file's bytes, or for a `datasets` folder its data files;
    for a glob pattern, of every matched file's name and hash, in reading order."""
    if is_pattern(path):
        return fingerprint([[f.name, input_sha256(f)] for f in input_files(path)])
    path = Path(path)
    if input_kind(path) == "datasets":
        parts = [sha256_file(f) for f in _datasets_files(path)]
        return fingerprint(parts)
    return sha256_file(path)


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    return str(value)


# A JSON \\u escape of a UTF-16 surrogate (\\ud800-\\udfff): valid JSON, but a lone one is no text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_BOM = b"\xef\xbb\xbf"


def _why(exc: BaseException) -> str:
    """An exception as one line: its type and message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _lone_surrogate(record: dict) -> str | None:
    """Where in ``record`` a string holds a lone surrogate (e.g. prompt, chosen[0].content)."""
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:  # iterative: records can be nested as deep as the JSON parser allows
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "a key"
        elif isinstance(value, dict):
            for key, child in reversed(value.items()):
                name = _printable(key)
                stack.append((f"{where}.{name}" if where else name, child))
                stack.append((where or "a key", key))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", child) for i, child in reversed(list(enumerate(value))))
    return None


def _parse_line(index: int, text: str) -> RawRow:
    try:
        record = json.loads(text)
    except ValueError as exc:
        return RawRow(index, text, None, "malformed_json", str(exc))
    except RecursionError:
        return RawRow(index, text, None, "malformed_json", "nested too deeply to parse")
    if not isinstance(record, dict):
        return RawRow(index, text, None, "not_an_object", f"a JSON {type(record).__name__}")
    if _SURROGATE_ESCAPE.search(text) and (where := _lone_surrogate(record)):
        detail = f"{where}: a lone surrogate (\\ud800-\\udfff escape) is not valid Unicode text"
        return RawRow(index, text, None, "malformed_json", detail)
    return RawRow(index, text, record)


def _jsonl_rows(path: Path, opener) -> Iterator[RawRow]:
    lines_read = 0
    try:
        with opener(path, "rb") as fh:
            for index, line in enumerate(fh):
                if index == 0 and line.startswith(_BOM):
                    line = line[len(_BOM) :]  # a UTF-8 byte order mark is not part of the row
                lines_read = index + 1
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raw = line.decode("utf-8", errors="replace").rstrip("\r\n")
                    yield RawRow(index, raw, None, "malformed_json", f"not UTF-8: {exc}")
                    continue
                text = text.rstrip("\r\n")
                if not text.strip():
                    continue  # blank lines are not rows
                yield _parse_line(index, text)
    except (EOFError, zlib.error, OSError) as exc:
        # Damage found after some rows were read fails the stage: a dataset from the rows before
        # it would pass for the whole file.
        gz = opener is not open
        raise DataError(
            f"{path}: the {'gzip stream' if gz else 'file'} is truncated or corrupt after "
            f"{lines_read} complete lines ({_why(exc)}); nothing from this file "
            "is used. Download or write the file again"
            + (f" (`gzip -t {path}` checks it)" if gz else "")
        ) from None


def _batch_records(batch: pa.RecordBatch, source: Path) -> list[dict]:
    """The batch's rows as dicts; a column Python cannot represent (timestamp[ns]) as text."""
    columns = []
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            values = column.to_pylist()
        except (ValueError, OverflowError, pa.ArrowException):
            try:
                values = column.cast(pa.string()).to_pylist()
            except (ValueError, pa.ArrowException) as exc:
                raise DataError(
                    f"{source}: column {name!r} of type {column.type} cannot be read ({exc}): "
                    "drop or convert that column"
                ) from None
        columns.append((name, values))
    return [{name: values[i] for name, values in columns} for i in range(batch.num_rows)]


def _table_rows(batches: Iterator[pa.RecordBatch], source: Path, what: str) -> Iterator[RawRow]:
    index = 0
    try:
        for batch in batches:
            for record in _batch_records(batch, source):
                raw = json.dumps(record, sort_keys=True, ensure_ascii=False, default=_json_default)
                yield RawRow(index, raw, record)
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{source}: the {what} is damaged after {index} rows ({_why(exc)}); "
            "nothing from it is used. Write or download it again"
        ) from None


def open_parquet(path: Path) -> pq.ParquetFile:
    """The Parquet file at ``path``, or a DataError when it is not one (or is truncated)."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{path} is not a readable Parquet file ({_why(exc)}); it may be "
            "truncated or another format", hint="write or download it again"
        ) from None


def _arrow_batches(files: list[Path]) -> Iterator[pa.RecordBatch]:
    for file in files:
        source = None
        try:
            source = pa.memory_map(str(file))
            try:
                reader = ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = ipc.open_file(source)
        except (pa.ArrowException, OSError) as exc:
            if source is not None:
                source.close()
            raise DataError(
                f"{file} is not a readable Arrow file ({_why(exc)}): save the "
                "dataset again with `save_to_disk`, or export it to .jsonl or .parquet"
            ) from None
        with source:
            if isinstance(reader, ipc.RecordBatchFileReader):
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
            else:
                yield from reader


def _no_rows(path: str | Path, files: list[Path], why: str) -> str:
    shown = f"data.path {path} ({len(files)} files)" if is_pattern(path) else str(path)
    return (f"{shown} has no rows ({why}): nothing to prepare. Write the preference data to it, "
            "or point data.path at another file")


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """All rows of the input, in order, parsed or not; a damaged file raises DataError, and so
    does an input without a single row (an empty file, blank lines only, a Parquet file or
    `datasets` folder of 0 rows). Rows of a glob pattern's files are numbered on from one file to
    the next (source_row)."""
    return _not_empty(path, _rows(path))


def _not_empty(path: str | Path, rows: Iterator[RawRow]) -> Iterator[RawRow]:
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        if is_pattern(path):
            why = "not one in its files"
        else:
            why = {"jsonl": "blank lines only", "jsonl.gz": "no lines, or blank lines only",
                   "parquet": "a Parquet file of 0 rows",
                   "datasets": "a `datasets` folder of 0 rows"}[input_kind(Path(path))]
        raise DataError(_no_rows(path, input_files(path), why))


def _rows(path: str | Path) -> Iterator[RawRow]:
    if is_pattern(path):
        return _chained_rows(input_files(path))
    path = Path(path)
    kind = input_kind(path)
    if kind == "jsonl":
        return _jsonl_rows(path, open)
    if kind == "jsonl.gz":
        return _jsonl_rows(path, gzip.open)
    if kind == "parquet":
        batches = open_parquet(path).iter_batches(batch_size=4096)
        return _table_rows(batches, path, "Parquet file")
    return _table_rows(_arrow_batches(_datasets_files(path)), path, "`datasets` folder")


def _chained_rows(files: list[Path]) -> Iterator[RawRow]:
    offset = 0
    for file in files:
        last = -1
        for row in _rows(file):
            last = row.source_row
            yield dataclasses.replace(row, source_row=offset + row.source_row)
        offset += last + 1


def count_rows(path: str | Path) -> int | None:
    """Rows of a Parquet input (from its metadata; a progress bar's total), else None."""
    files = input_files(path)
    if not all(input_kind(f) == "parquet" for f in files):
        return None
    return sum(open_parquet(f).metadata.num_rows for f in files)


__all__ = ["DataError", "RawRow", "check_input", "count_rows", "hub_source", "input_sha256", "open_parquet", "read_rows",
           "resolve_input"]
