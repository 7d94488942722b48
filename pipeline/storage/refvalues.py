"""Proof of a reference cache's values, without a model: what a shard must show before it is used.

    metadata = {COLUMNS_KEY: column_digests(table)}      # score: written inside each shard
    table = read_shard(path, columns)                    # train / score / audit: checked on read
    problems = row_problems(table)                       # every row's model-free consistency

Three layers, each catching what the others cannot:

- **Parquet page checksums** (CRC32 of every data page, ``write_page_checksum``), verified on
  every read: a bit flipped in the file's bytes fails the read.
- **Column digests** in the shard's key-value metadata (``dpo_pipeline.column_sha256``): the
  sha256 of each value column's canonical bytes (little-endian values, list lengths, string
  lengths and bytes; independent of Parquet's encoding and compression), computed from the
  values the scorer produced before they were written. A value changed and the file rewritten
  (new pages, new page checksums, same metadata) fails here.
- **Row checks**: every value finite, a log-prob at most 0 and at least ``-MAX_NATS_PER_TOKEN``
  per token, one per-token value per token, and each sequence value equal to the sum of its
  per-token values where both are stored. A shard whose digests were recomputed after a change
  still fails these when the change broke them.

A shard written before digests existed (no ``COLUMNS_KEY``) is *legacy*: it is trusted only
through its manifest entry's sha256 (and the row checks), never adopted without one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_dataset
import pyarrow.parquet as pq

from pipeline.errors import ValueProofError

COLUMNS_KEY = "dpo_pipeline.column_sha256"
"""Parquet key-value metadata: JSON {column: sha256 of its canonical bytes}."""

MAX_NATS_PER_TOKEN = 1000.0
"""A per-token log-prob below -1000 nats is no model's output (a float32 log-softmax over real
logits stays far above it): such a value is damage, not a rare token."""

POSITIVE_SLACK = 1e-3
"""Rounding allowance above 0 per token (log-probs are <= 0; some backends round up)."""

SUM_RTOL = 1e-9
"""Sequence value vs the float64 sum of its per-token values, relative to the sum of their
magnitudes: float64 summation orders differ by ~1e-16 x tokens; a flipped bit by far more."""

SIDES = ("chosen", "rejected")


# --- digests --------------------------------------------------------------------------------------


def _canonical(column: pa.ChunkedArray | pa.Array) -> bytes:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    nested = pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
    kind = "list" if nested else array.type  # a list's field name (item / element) is Parquet's, not ours
    parts = [f"{kind}|{len(array)}|{array.null_count}|".encode()]
    if pa.types.is_string(array.type) or pa.types.is_binary(array.type):
        parts.append(pc.binary_length(array).fill_null(-1).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
        parts.extend(b"" if v is None else v.encode() if isinstance(v, str) else v for v in array.to_pylist())
    elif nested:
        parts.append(pc.list_value_length(array).fill_null(-1).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
        parts.append(_canonical(pc.list_flatten(array)))
    else:
        values = array.to_numpy(zero_copy_only=False)
        parts.append(values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
    return b"".join(parts)


def column_digests(table: pa.Table) -> str:
    """JSON {column: sha256} of every column of ``table`` (the value for ``COLUMNS_KEY``)."""
    return json.dumps({name: hashlib.sha256(_canonical(table.column(name))).hexdigest()
                       for name in table.column_names}, sort_keys=True)


def recorded_digests(metadata: dict | None) -> dict | None:
    """The digests a shard's metadata records, or None for a legacy shard (or unreadable ones)."""
    raw = (metadata or {}).get(COLUMNS_KEY.encode())
    try:
        value = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def check_digests(table: pa.Table, recorded: dict | None, name: str) -> None:
    """Every column of ``table`` hashes as ``recorded`` says, or ValueProofError naming them."""
    if recorded is None:
        raise ValueProofError(f"{name} records no checksum of its values (written by an older version)")
    now = json.loads(column_digests(table))
    changed = [column for column in table.column_names if recorded.get(column) != now[column]]
    if changed:
        raise ValueProofError(f"{name}: the values of {', '.join(changed)} differ from the checksum "
                              "written with them when the shard was scored")


# --- row checks -----------------------------------------------------------------------------------


@dataclass
class RowProblem:
    row: int  # in the table checked
    id: str
    side: str
    problem: str

    def __str__(self) -> str:
        return f"id {self.id} ({self.side}: {self.problem})"


def _side_problems(table: pa.Table, side: str) -> list[tuple[int, str]]:
    logp = table.column(f"{side}_logp").to_numpy().astype(np.float64)
    tokens = table.column(f"{side}_tokens").to_numpy().astype(np.int64)
    found: list[tuple[int, str]] = []

    def flag(mask, text):
        found.extend((int(i), text(int(i))) for i in np.flatnonzero(mask))

    finite = np.isfinite(logp)
    flag(~finite, lambda i: f"sequence log-prob {logp[i]}")
    flag(finite & (logp > POSITIVE_SLACK * tokens), lambda i: f"sequence log-prob {logp[i]:.6g} > 0")
    flag(finite & (logp < -MAX_NATS_PER_TOKEN * tokens),
         lambda i: f"sequence log-prob {logp[i]:.6g} below {-MAX_NATS_PER_TOKEN:g} nats x {tokens[i]} tokens")
    flag(tokens < 0, lambda i: f"token count {tokens[i]}")
    name = f"{side}_token_logps"
    if name not in table.column_names:
        return found
    per_token = table.column(name).combine_chunks()
    lengths = pc.list_value_length(per_token).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    flag(lengths != tokens, lambda i: f"{lengths[i]} per-token values for {tokens[i]} tokens")
    values = pc.list_flatten(per_token).to_numpy(zero_copy_only=False).astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]]).astype(np.int64)
    bad_token = ~np.isfinite(values) | (values > POSITIVE_SLACK) | (values < -MAX_NATS_PER_TOKEN)
    row_of = np.repeat(np.arange(len(lengths)), np.maximum(lengths, 0))
    for i in np.unique(row_of[bad_token]):
        first = int(np.flatnonzero(bad_token & (row_of == i))[0] - starts[i])
        found.append((int(i), f"per-token log-prob {values[starts[i] + first]:.6g} at position {first}"))
    safe = np.where(np.isfinite(values), values, 0.0)
    padded = np.append(safe, 0.0)  # reduceat needs every start < len
    nonempty = lengths > 0
    sums = np.where(nonempty, np.add.reduceat(padded, np.minimum(starts, len(safe))), 0.0)
    magnitude = np.where(nonempty, np.add.reduceat(np.append(np.abs(safe), 0.0), np.minimum(starts, len(safe))), 0.0)
    off = finite & (lengths == tokens) & (np.abs(logp - sums) > SUM_RTOL * (1.0 + magnitude))
    flag(off, lambda i: f"sequence log-prob {logp[i]:.6g} != {sums[i]:.6g}, the sum of its per-token values")
    return found


ROW_COLUMNS = ("id", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens")


def row_problems(table: pa.Table) -> list[RowProblem]:
    """Every row that fails a check needing no model (finite, bounds, counts, sums), in row order."""
    found = sorted((i, side, text) for side in SIDES for i, text in _side_problems(table, side))
    ids = table.column("id")
    return [RowProblem(i, ids[i].as_py(), side, text) for i, side, text in found]


def describe(problems: list[RowProblem], limit: int = 3) -> str:
    rows = len({p.id for p in problems})
    shown = "; ".join(str(p) for p in problems[:limit])
    return f"{rows} row(s) fail the value checks: {shown}" + (" ..." if len(problems) > limit else "")


# --- reading ------------------------------------------------------------------------------------


def read_shard(path: str | Path, columns: list[str] | None = None, require_digests: bool = True) -> pa.Table:
    """The shard's ``columns`` (default: all), read with page checksums verified, their digests
    checked and every row checked; ValueProofError names what failed. ``require_digests`` False
    accepts a legacy shard (its manifest entry's sha256 is then the proof)."""
    path = Path(path)
    try:
        file = pq.ParquetFile(path, page_checksum_verification=True)
        table = file.read(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise ValueProofError(f"{path.name} cannot be read ({exc})") from None
    recorded = recorded_digests(file.schema_arrow.metadata)
    if recorded is not None or require_digests:
        check_digests(table, recorded, path.name)
    if set(ROW_COLUMNS) <= set(table.column_names):
        problems = row_problems(table)
        if problems:
            raise ValueProofError(f"{path.name}: {describe(problems)}")
    return table


def read_shards(paths: list[Path], columns: list[str] | None, require_digests: bool = False) -> pa.Table:
    """The shards' ``columns`` (None: all) in order, each proven as ``read_shard`` proves one; one
    multithreaded scan (10,000 one-row shards: ~4 s, file by file ~9 s; bench/shards_bench.py)."""
    scan = pa_dataset.ParquetFragmentScanOptions(page_checksum_verification=True)
    dataset = pa_dataset.dataset([str(p) for p in paths], format=pa_dataset.ParquetFileFormat(default_fragment_scan_options=scan))
    columns = dataset.schema.names if columns is None else columns
    try:
        table = dataset.to_table(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise ValueProofError(f"the cache's shards cannot be read ({exc})") from None
    starts = [0]
    for path, fragment in zip(paths, dataset.get_fragments()):
        footer = fragment.metadata  # the file's footer: row count and key-value metadata, one read
        rows = footer.num_rows
        recorded = recorded_digests(footer.metadata)
        if recorded is not None or require_digests:
            check_digests(table.slice(starts[-1], rows), recorded, Path(path).name)
        starts.append(starts[-1] + rows)
    problems = row_problems(table) if set(ROW_COLUMNS) <= set(columns) else []
    if problems:
        shard = Path(paths[int(np.searchsorted(starts, problems[0].row, side="right")) - 1]).name
        raise ValueProofError(f"{shard}: {describe(problems)}")
    return table
