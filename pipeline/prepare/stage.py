"""The prepare stage: preference data in, validated token ids out.

    result = prepare(load_config("run.yaml"))
    result.output_dir  # <storage>/datasets/<fingerprint>/ with examples.parquet, rejects.parquet,
                       # manifest.json

Token ids are decided here, once; scoring and training read them and never re-tokenize. The
stage's own modules: pipeline.prepare.records (one record validated and normalized, or rejected, with
REJECT_REASONS) and pipeline.prepare.encoder (the tokenizer with the rules below).

The prompt/response boundary (also written into every manifest under "contract"):
- plain text (standard and implicit-prompt text): the prompt is tokenized with the tokenizer's
  special tokens (e.g. BOS), each response without them, and EOS is appended to responses
  (``tokenize.add_eos``). Prompt and response are tokenized separately, so the prompt ends exactly
  where the response begins, as it does when the model generates after the prompt.
- chat (conversational and implicit-prompt conversations): the prompt is the chat template
  rendered with the generation prompt; the response is the text the template adds after it when
  the assistant turn is rendered. If the rendered conversation does not start with the rendered
  prompt (templates that render earlier turns differently once an answer follows), the row is
  rejected with reason ``chat_template_prefix_mismatch``: scoring such a response after a prompt
  the model would never have seen measures the wrong thing. If the text is a prefix but the joint
  tokenization merges tokens across the boundary, the separate tokenization is kept (it is what
  generation produces) and the row is counted under ``chat_boundary_retokenized``. The template's
  own end-of-turn token ends the response; trailing whitespace after a final EOS is dropped and no
  second EOS is appended.
- truncation: the prompt is capped at ``max_prompt_length`` tokens (keep_end cuts its start but
  keeps a leading BOS; keep_start cuts its end), then each response is cut at its end so that
  prompt + response <= ``max_length``. A row whose prompt leaves fewer than
  ``min_response_tokens`` is rejected as ``too_long``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config.schema import Config
from pipeline.data import (
    RawRow,
    check_input,
    count_rows,
    hub_source,
    input_files,
    is_pattern,
    read_rows,
    resolve_input,
)
from pipeline.errors import PrepareError
from pipeline.models.loading import load_tokenizer, model_source
from pipeline.prepare.encoder import Encoder
from pipeline.prepare.records import Reject, detect_format, example_id, normalize, split_of
from pipeline.progress import Progress
from pipeline.storage import paths, trust
from pipeline.store import (
    atomic_path,
    ensure_dir,
    exclusive,
    fingerprint,
    lock_path,
    sha256_file,
    write_manifest,
    write_parquet,
)

log = logging.getLogger("dpo.prepare")

# Row groups of 1024 examples (a few MB of token ids) let training and scoring read in chunks
# without loading the whole file; larger groups would not compress better.
ROW_GROUP_ROWS = 1024

EXAMPLES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("source_row", pa.int64()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("prompt_tokens", pa.int32()),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
        ("prompt_truncated", pa.bool_()),
        ("chosen_truncated", pa.bool_()),
        ("rejected_truncated", pa.bool_()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("source_row", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
    ]
)


@dataclass
class PrepareResult:
    output_dir: Path
    manifest: dict
    skipped: bool


# --- the stage -------------------------------------------------------------------------------


def _chunks(rows: Iterator[RawRow], size: int) -> Iterator[list[RawRow]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def _progress(total: int | None, enabled: bool) -> Progress:
    return Progress(total, "prepare", "rows", enabled, log)


def prepare(cfg: Config, show_progress: bool = True) -> PrepareResult:
    """Run the prepare stage (or find its complete output) and return where the dataset lives."""
    data_path = check_input(resolve_input(cfg.data, cfg.storage))
    inputs = paths.dataset_identity(cfg)
    fp = fingerprint(inputs)
    out_dir = paths.dataset_dir(cfg.storage, fp)
    if trust.is_verified(trust.verified_dataset, out_dir):
        log.info("prepare: up to date, %s", out_dir)
        return PrepareResult(out_dir, trust.verified_dataset(out_dir), skipped=True)
    # One writer per dataset; a second `dpo prepare` of the same data waits, then finds it done.
    with exclusive(lock_path(cfg.storage, "datasets", fp), f"dataset {out_dir}", wait=True):
        if trust.is_verified(trust.verified_dataset, out_dir):
            return PrepareResult(out_dir, trust.verified_dataset(out_dir), skipped=True)
        _clear(out_dir)
        started = time.perf_counter()
        tokenizer = load_tokenizer(cfg.model)
        hub = hub_source(cfg.data, cfg.storage)
        written = _write_dataset(cfg, data_path, tokenizer, out_dir, show_progress)
        manifest = {
            "kind": "dataset",
            "fingerprint": fp,
            "inputs": inputs,
            "source": _source(cfg, data_path, hub),
            "tokenizer_source": model_source(cfg.model),
            **written,
            "contract": _contract(cfg, tokenizer, written["chat_template_applied"]),
            "versions": paths.library_versions(),
            "seconds": round(time.perf_counter() - started, 3),
            "complete": True,
        }
        write_manifest(out_dir, manifest)
    return PrepareResult(out_dir, manifest, skipped=False)


def _clear(out_dir: Path) -> None:
    """Remove what a dead writer left (called under the lock): a dataset is written whole."""
    ensure_dir(out_dir)
    for leftover in out_dir.iterdir():
        leftover.unlink()


def _source(cfg: Config, data_path: Path, hub: dict | None) -> dict:
    """What was read: the path (a Hub id with what it resolved to, or a pattern with its files)."""
    if hub:
        return {"path": str(cfg.data.path), "hub": hub, "local": str(data_path)}
    if is_pattern(data_path):
        return {"path": str(data_path), "files": [str(f) for f in input_files(data_path)]}
    return {"path": str(data_path)}


@dataclass
class _Writer:
    """What every chunk shares: the settings, the encoder, the ids seen so far (exact copies are
    rejected as ``duplicate``), the running counts and the rejects' columns."""

    cfg: Config
    fmt: str
    encoder: Encoder
    seen: dict[str, int] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
    rejects: dict[str, list] = field(default_factory=lambda: {name: [] for name in REJECTS_SCHEMA.names})

    def reject(self, row: RawRow, reason: str, detail: str) -> None:
        for name, value in zip(REJECTS_SCHEMA.names, (row.source_row, reason, detail, row.raw)):
            self.rejects[name].append(value)


def _write_dataset(cfg: Config, data_path: Path, tokenizer, out_dir: Path, show_progress: bool) -> dict:
    """Write examples.parquet and rejects.parquet; return the manifest's counts and files."""
    rows = read_rows(data_path)
    sample = list(itertools.islice(rows, 256))
    fmt = cfg.data.format
    if fmt == "auto":
        fmt = detect_format((r.record for r in sample if r.record is not None), cfg)
    chat = fmt == "conversational" or (
        fmt == "implicit"
        and any(isinstance(r.record.get(cfg.data.chosen_column), list) for r in sample if r.record is not None)
    )
    log.info("prepare: %s, format %s%s", data_path, fmt, " (chat template)" if chat else "")
    writer = _Writer(cfg, fmt, Encoder(tokenizer, cfg, chat))
    examples_path = out_dir / paths.EXAMPLES
    with _progress(count_rows(data_path), show_progress) as bar:
        stats = _write_examples(examples_path, itertools.chain(sample, rows), writer, bar)
    rejects = writer.rejects
    kept, rejected, rows_read = stats["kept"], len(rejects["reason"]), stats["rows_read"]
    if kept + rejected != rows_read:  # an internal invariant; never expected to fire
        raise PrepareError(f"accounting error: {kept} kept + {rejected} rejected != {rows_read} read")
    rejects_path = out_dir / paths.REJECTS
    rejects_sha = write_parquet(pa.table(rejects, schema=REJECTS_SCHEMA), rejects_path, row_group_size=65536)
    by_reason = dict(sorted(Counter(rejects["reason"]).items()))
    _check_reject_share(cfg, data_path, rows_read, rejected, by_reason, rejects_path)
    counts = {"rows_read": rows_read, "kept": kept, "rejected": rejected, "rejected_by_reason": by_reason}
    for key in ("train", "eval", "prompt_truncated", "chosen_truncated", "rejected_truncated"):
        counts[key] = stats[key]
    counts["chat_boundary_retokenized"] = stats["retokenized"]
    return {
        "format": fmt,
        "chat_template_applied": chat,
        "counts": counts,
        "tokens": {"prompt": stats["prompt_tokens"], "chosen": stats["chosen_tokens"],
                   "rejected": stats["rejected_tokens"], "max_sequence": stats["max_sequence"]},
        "files": {
            paths.EXAMPLES: {"sha256": sha256_file(examples_path, use_cache=False), "rows": kept},
            paths.REJECTS: {"sha256": rejects_sha, "rows": rejected},
        },
    }


def _write_examples(path: Path, rows: Iterator[RawRow], writer: _Writer, bar) -> Counter:
    """Tokenize ``rows`` in chunks into ``path``; rejected rows go to ``writer.reject``. Returns stats."""
    stats = writer.stats
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, EXAMPLES_SCHEMA, compression="zstd") as out:
        pending = EXAMPLES_SCHEMA.empty_table()
        for chunk in _chunks(rows, writer.cfg.tokenize.batch_rows):
            stats["rows_read"] += len(chunk)
            batch = _process_chunk(chunk, writer)
            if batch is not None:
                pending = pa.concat_tables([pending, pa.Table.from_batches([batch])])
            # Fixed-size row groups, so the file's bytes do not depend on tokenize.batch_rows.
            while pending.num_rows >= ROW_GROUP_ROWS:
                out.write_table(pending.slice(0, ROW_GROUP_ROWS))
                pending = pending.slice(ROW_GROUP_ROWS)
            bar.update(len(chunk))
        if pending.num_rows:
            out.write_table(pending)
    return stats


def _check_reject_share(cfg: Config, data_path, rows_read: int, rejected: int, by_reason: dict, rejects_path) -> None:
    if rows_read == 0:
        raise PrepareError(f"{data_path} has no rows: nothing to prepare")
    if rejected / rows_read > cfg.data.max_reject_fraction:
        raise PrepareError(
            f"{rejected} of {rows_read} rows rejected ({rejected / rows_read:.0%}), more than "
            f"data.max_reject_fraction={cfg.data.max_reject_fraction}: {by_reason}. The rejected "
            f"rows with reasons are in {rejects_path}. Fix the data or the column/format settings "
            "(data.format, data.*_column), or raise data.max_reject_fraction"
        )


def _contract(cfg: Config, tokenizer, chat: bool) -> dict:
    """How the token ids were made: what scoring and training may rely on."""
    return {
        "boundary": "prompt and responses tokenized separately; sequence = prompt_ids + response_ids",
        "prompt_special_tokens": not chat,
        "response_eos_appended": (not chat) and cfg.tokenize.add_eos,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
        "truncation": {
            "max_length": cfg.tokenize.max_length,
            "max_prompt_length": cfg.tokenize.max_prompt_length,
            "truncation_mode": cfg.tokenize.truncation_mode,
            "max_completion_length": cfg.tokenize.max_completion_length,
            "responses": "cut at the end",
        },
    }


def _row_too_large(row: RawRow, limit: int | None) -> str | None:
    """The reject detail when the row is above data.max_row_bytes, else None."""
    if limit is None or len(row.raw) * 4 <= limit:  # UTF-8: at most 4 bytes per character
        return None
    size = len(row.raw.encode("utf-8", "surrogatepass"))
    if size <= limit:
        return None
    return (
        f"{size} bytes, above data.max_row_bytes={limit}: raise data.max_row_bytes "
        "(null: no limit) to tokenize it"
    )


def _candidates(chunk: list[RawRow], writer: _Writer) -> list[tuple]:
    """(row, id, prompt_text, chosen_text, rejected_text) of the chunk's rows that pass the
    checks before tokenizing; the others go to ``writer.reject``."""
    candidates = []
    for row in chunk:
        if row.error:
            writer.reject(row, row.error, row.detail)
            continue
        if detail := _row_too_large(row, writer.cfg.data.max_row_bytes):
            writer.reject(row, "row_too_large", detail)
            continue
        try:
            prompt, chosen, rejected = normalize(row.record, writer.fmt, writer.cfg)
            ex_id = example_id(prompt, chosen, rejected)
            if ex_id in writer.seen:
                raise Reject("duplicate", f"same as source row {writer.seen[ex_id]}")
            texts = writer.encoder.render(prompt, chosen, rejected)
        except Reject as exc:
            writer.reject(row, exc.reason, exc.detail)
            continue
        writer.seen[ex_id] = row.source_row
        candidates.append((row, ex_id, *texts))
    return candidates


def _count(stats: Counter, split: str, ids: tuple, cuts: tuple) -> None:
    """Add one kept example (its split, token ids and truncation flags) to the stage's counts."""
    p, c, r = ids
    stats["kept"] += 1
    stats[split] += 1
    stats["prompt_truncated"] += cuts[0]
    stats["chosen_truncated"] += cuts[1]
    stats["rejected_truncated"] += cuts[2]
    stats["prompt_tokens"] += len(p)
    stats["chosen_tokens"] += len(c)
    stats["rejected_tokens"] += len(r)
    stats["max_sequence"] = max(stats["max_sequence"], len(p) + max(len(c), len(r)))


def _process_chunk(chunk: list[RawRow], writer: _Writer) -> pa.RecordBatch | None:
    """The chunk's kept examples as one record batch (None when none is kept)."""
    candidates = _candidates(chunk, writer)
    if not candidates:
        return None
    rows, ids, prompts, chosens, rejecteds = (list(col) for col in zip(*candidates))
    prompt_ids, chosen_ids, rejected_ids, retokenized = writer.encoder.tokenize(prompts, chosens, rejecteds)
    writer.stats["retokenized"] += retokenized

    columns: dict[str, list] = {name: [] for name in EXAMPLES_SCHEMA.names}
    for i, row in enumerate(rows):
        try:
            p, c, r, p_cut, c_cut, r_cut = writer.encoder.truncate(prompt_ids[i], chosen_ids[i], rejected_ids[i])
        except Reject as exc:
            writer.reject(row, exc.reason, exc.detail)
            continue
        split = split_of(ids[i], writer.cfg.data.eval_fraction)
        values = (
            ids[i], split, row.source_row, prompts[i], chosens[i], rejecteds[i], p, c, r,
            len(p), len(c), len(r), p_cut, c_cut, r_cut,
        )
        for name, value in zip(EXAMPLES_SCHEMA.names, values):
            columns[name].append(value)
        _count(writer.stats, split, (p, c, r), (p_cut, c_cut, r_cut))
    if not columns["id"]:
        return None
    return pa.RecordBatch.from_pydict(columns, schema=EXAMPLES_SCHEMA)
