"""The prepare stage: preference data in, validated token ids out.

    result = prepare(load_config("run.yaml"))
    result.output_dir  # <storage>/datasets/<fingerprint>/ with examples.parquet, rejects.parquet,
                       # manifest.json

Token ids are decided here, once; scoring and training read them and never re-tokenize.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import layout
from .config import Config
from .data import RawRow, check_input, count_rows, hub_source, input_files, is_pattern, read_rows, resolve_input
from .models import ModelError, load_tokenizer, model_source
from .progress import Progress
from .store import (
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

ID_HEX_CHARS = 16  # 64-bit content ids: collisions are negligible below ~1e8 examples
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

# Every reason a row can be rejected for; docs/reference/prepare.md documents them.
REJECT_REASONS = {
    "malformed_json": "the line is not valid JSON, or not text (not UTF-8, a lone surrogate)",
    "not_an_object": "the line is valid JSON but not an object",
    "missing_field": "a required column is absent or null",
    "empty_field": "a prompt or response is empty or only whitespace",
    "wrong_type": "a field has the wrong type for the data format (e.g. a number, not text)",
    "chosen_equals_rejected": "the two responses are identical",
    "duplicate": "an exact copy (same prompt, chosen, rejected) of an earlier row",
    "no_shared_prompt": "implicit prompt: the two texts share no prompt ending in the marker",
    "prompts_differ": "implicit conversations: the turns before the final answer differ",
    "chat_template_prefix_mismatch": "the chat template renders the prompt differently once an answer follows",
    "too_long": "the prompt leaves no room for a response within tokenize.max_length",
    "row_too_large": "the row is larger than data.max_row_bytes (rejected before tokenizing)",
}


class PrepareError(RuntimeError):
    """The stage cannot produce a dataset; the message says what to fix."""


class _Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REJECT_REASONS, reason
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class PrepareResult:
    output_dir: Path
    manifest: dict
    skipped: bool


# --- validation and normalization of one record --------------------------------------------------


def _text(record: dict, column: str) -> str:
    if column not in record or record[column] is None:
        raise _Reject("missing_field", f"no {column!r}")
    value = record[column]
    if not isinstance(value, str):
        raise _Reject("wrong_type", f"{column!r} is a {type(value).__name__}, expected text")
    if not value.strip():
        raise _Reject("empty_field", f"{column!r} is empty")
    return value


def _messages(record: dict, column: str, response: bool) -> list[dict]:
    if column not in record or record[column] is None:
        raise _Reject("missing_field", f"no {column!r}")
    value = record[column]
    if response and isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise _Reject("wrong_type", f"{column!r} is a {type(value).__name__}, expected messages")
    if not value:
        raise _Reject("empty_field", f"{column!r} has no messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _Reject("wrong_type", f"{column}[{i}] is not a {{role, content}} message")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _Reject("wrong_type", f"{column}[{i}] needs string role and content")
        messages.append({"role": role, "content": content})
    if response and not any(m["content"].strip() for m in messages):
        raise _Reject("empty_field", f"{column!r} has no content")
    if not response and not any(m["content"].strip() for m in messages):
        raise _Reject("empty_field", f"{column!r} has no content")
    return messages


def _split_implicit_text(chosen: str, rejected: str, marker: str) -> tuple[str, str, str]:
    # The last marker in chosen whose prefix rejected shares (str methods, no per-char loop).
    cut = chosen.rfind(marker)
    while cut >= 0 and not rejected.startswith(chosen[: cut + len(marker)]):
        cut = chosen.rfind(marker, 0, cut)
    if cut < 0:
        raise _Reject("no_shared_prompt", f"no shared prefix ending in {marker!r}")
    end = cut + len(marker)
    prompt, chosen_response, rejected_response = chosen[:end], chosen[end:], rejected[end:]
    for name, response in (("chosen", chosen_response), ("rejected", rejected_response)):
        if not response.strip():
            raise _Reject("empty_field", f"{name} response after the prompt is empty")
    return prompt, chosen_response, rejected_response


def _split_implicit_chat(chosen: list[dict], rejected: list[dict]):
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise _Reject("wrong_type", f"{name} does not end with an assistant message")
        if len(conv) < 2:
            raise _Reject("empty_field", f"{name} has no prompt before the final answer")
    if chosen[:-1] != rejected[:-1]:
        raise _Reject("prompts_differ", "the turns before the final answer differ")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def normalize(record: dict, fmt: str, cfg: Config) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected): strings for text formats, message lists for chat formats."""
    d = cfg.data
    if fmt == "standard":
        prompt = _text(record, d.prompt_column)
        chosen, rejected = _text(record, d.chosen_column), _text(record, d.rejected_column)
    elif fmt == "conversational":
        prompt = _messages(record, d.prompt_column, response=False)
        chosen = _messages(record, d.chosen_column, response=True)
        rejected = _messages(record, d.rejected_column, response=True)
    elif fmt == "implicit":
        raw_chosen = record.get(d.chosen_column)
        if isinstance(raw_chosen, list):
            prompt, chosen, rejected = _split_implicit_chat(
                _messages(record, d.chosen_column, response=True),
                _messages(record, d.rejected_column, response=True),
            )
        else:
            prompt, chosen, rejected = _split_implicit_text(
                _text(record, d.chosen_column),
                _text(record, d.rejected_column),
                d.implicit_prompt_marker,
            )
    else:  # pragma: no cover - detect_format never returns anything else
        raise ValueError(fmt)
    if chosen == rejected:
        raise _Reject("chosen_equals_rejected", "")
    return prompt, chosen, rejected


def detect_format(records: Iterable[dict], cfg: Config) -> str:
    """standard | conversational | implicit, by majority over the sample's parseable records."""
    d = cfg.data
    votes: Counter = Counter()
    for record in records:
        prompt = record.get(d.prompt_column)
        if isinstance(prompt, str):
            votes["standard"] += 1
        elif isinstance(prompt, list):
            votes["conversational"] += 1
        elif prompt is None and d.chosen_column in record and d.rejected_column in record:
            votes["implicit"] += 1
    if not votes:
        raise PrepareError(
            f"cannot tell the data format: no record has a {d.prompt_column!r} column, nor "
            f"{d.chosen_column!r} and {d.rejected_column!r} columns. Set data.prompt_column / "
            "data.chosen_column / data.rejected_column to your column names, or data.format"
        )
    return votes.most_common(1)[0][0]


def example_id(prompt, chosen, rejected) -> str:
    return fingerprint({"prompt": prompt, "chosen": chosen, "rejected": rejected})[:ID_HEX_CHARS]


def split_of(example_id_hex: str, eval_fraction: float) -> str:
    """Deterministic split from the id alone: its value as a fraction of the 64-bit range."""
    return "eval" if int(example_id_hex, 16) / 16**ID_HEX_CHARS < eval_fraction else "train"


# --- tokenization ----------------------------------------------------------------------------


class _Tokenizer:
    """The fast tokenizer's batch API plus the rendering rules documented in the module."""

    def __init__(self, tokenizer, cfg: Config, chat: bool):
        self.hf_tokenizer = tokenizer
        self.cfg = cfg.tokenize
        self.chat = chat
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ModelError(
                f"the tokenizer in {cfg.model.path} has no chat template, but the data is in "
                "chat format: use a model with a chat template, or give the data as plain text "
                "(data.format=standard with string prompt/chosen/rejected)"
            )
        if not chat and self.cfg.add_eos and self.eos_id is None:
            raise ModelError(
                f"the tokenizer in {cfg.model.path} has no EOS token, so none can be appended: "
                "set tokenize.add_eos=false or add an eos_token to tokenizer_config.json"
            )

    def encode(self, texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        out = self.hf_tokenizer(
            texts,
            add_special_tokens=special,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return out["input_ids"]

    def render(self, prompt, chosen, rejected) -> tuple[str, str, str]:
        """Text of prompt and both responses; raises _Reject for templates that do not prefix."""
        if not self.chat:
            return prompt, chosen, rejected
        prompt_text = self.hf_tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )
        responses = []
        for response in (chosen, rejected):
            full = self.hf_tokenizer.apply_chat_template(prompt + response, tokenize=False)
            if not full.startswith(prompt_text):
                raise _Reject(
                    "chat_template_prefix_mismatch",
                    "rendered conversation does not start with the rendered prompt",
                )
            text = full[len(prompt_text) :]
            eos = self.hf_tokenizer.eos_token
            if eos and text.rstrip().endswith(eos):
                text = text.rstrip()
            responses.append(text)
        return prompt_text, responses[0], responses[1]

    def tokenize(self, prompts, chosens, rejecteds) -> tuple[list, list, list, int]:
        """Token ids of prompts and responses; last value counts chat boundary re-tokenizations."""
        prompt_ids = self.encode(prompts, special=not self.chat)
        chosen_ids = self.encode(chosens, special=False)
        rejected_ids = self.encode(rejecteds, special=False)
        if not self.chat and self.cfg.add_eos:
            for ids in itertools.chain(chosen_ids, rejected_ids):
                ids.append(self.eos_id)
        retokenized = 0
        if self.chat:
            # The check: are the prompt ids a prefix of the whole conversation's ids?
            joint = self.encode([p + c for p, c in zip(prompts, chosens)], special=False)
            for p_ids, c_ids, j_ids in zip(prompt_ids, chosen_ids, joint):
                if j_ids != p_ids + c_ids:
                    retokenized += 1
        return prompt_ids, chosen_ids, rejected_ids, retokenized

    def truncate(self, prompt_ids, chosen_ids, rejected_ids):
        """Apply the truncation rules; returns ids and flags, or raises _Reject('too_long')."""
        cfg = self.cfg
        prompt_cut = False
        limit = cfg.max_prompt_length
        if limit is not None and len(prompt_ids) > limit:
            prompt_cut = True
            if cfg.truncation_mode == "keep_start":
                prompt_ids = prompt_ids[:limit]
            elif self.bos_id is not None and prompt_ids[0] == self.bos_id:
                prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - limit + 1 :]
            else:
                prompt_ids = prompt_ids[len(prompt_ids) - limit :]
        budget = cfg.max_length - len(prompt_ids)
        if cfg.max_completion_length is not None:
            budget = min(budget, cfg.max_completion_length)
        if budget < cfg.min_response_tokens:
            raise _Reject(
                "too_long",
                f"prompt has {len(prompt_ids)} tokens; tokenize.max_length is {cfg.max_length}",
            )
        chosen_cut, rejected_cut = len(chosen_ids) > budget, len(rejected_ids) > budget
        return (
            prompt_ids,
            chosen_ids[:budget],
            rejected_ids[:budget],
            prompt_cut,
            chosen_cut,
            rejected_cut,
        )


# --- the stage -------------------------------------------------------------------------------


def _chunks(rows: Iterator[RawRow], size: int) -> Iterator[list[RawRow]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def _progress(total: int | None, enabled: bool) -> Progress:
    return Progress(total, "prepare", "rows", enabled, log)


def prepare(cfg: Config, show_progress: bool = True) -> PrepareResult:
    """Run the prepare stage (or find its complete output) and return where the dataset lives."""
    data_path = check_input(resolve_input(cfg.data, cfg.storage))
    inputs = layout.dataset_identity(cfg)
    fp = fingerprint(inputs)
    out_dir = layout.dataset_dir(cfg.storage, fp)
    if layout.is_verified(layout.verified_dataset, out_dir):
        log.info("prepare: up to date, %s", out_dir)
        return PrepareResult(out_dir, layout.verified_dataset(out_dir), skipped=True)
    # One writer per dataset; a second `dpo prepare` of the same data waits, then finds it done.
    with exclusive(lock_path(cfg.storage, "datasets", fp), f"dataset {out_dir}", wait=True):
        if layout.is_verified(layout.verified_dataset, out_dir):
            return PrepareResult(out_dir, layout.verified_dataset(out_dir), skipped=True)
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
            "versions": layout.library_versions(),
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
    encoder = _Tokenizer(tokenizer, cfg, chat)
    rejects: dict[str, list] = {name: [] for name in REJECTS_SCHEMA.names}

    def reject(row: RawRow, reason: str, detail: str) -> None:
        for name, value in zip(REJECTS_SCHEMA.names, (row.source_row, reason, detail, row.raw)):
            rejects[name].append(value)

    examples_path = out_dir / layout.EXAMPLES
    with _progress(count_rows(data_path), show_progress) as bar:
        stats = _write_examples(examples_path, itertools.chain(sample, rows), fmt, cfg, encoder, reject, bar)
    kept, rejected, rows_read = stats["kept"], len(rejects["reason"]), stats["rows_read"]
    if kept + rejected != rows_read:  # an internal invariant; never expected to fire
        raise PrepareError(f"accounting error: {kept} kept + {rejected} rejected != {rows_read} read")
    rejects_path = out_dir / layout.REJECTS
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
            layout.EXAMPLES: {"sha256": sha256_file(examples_path, use_cache=False), "rows": kept},
            layout.REJECTS: {"sha256": rejects_sha, "rows": rejected},
        },
    }


def _write_examples(path: Path, rows: Iterator[RawRow], fmt: str, cfg: Config, encoder, reject, bar) -> Counter:
    """Tokenize ``rows`` in chunks into ``path``; rejected rows go to ``reject``. Returns stats."""
    seen: dict[str, int] = {}
    stats: Counter = Counter()
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, EXAMPLES_SCHEMA, compression="zstd") as writer:
        pending = EXAMPLES_SCHEMA.empty_table()
        for chunk in _chunks(rows, cfg.tokenize.batch_rows):
            stats["rows_read"] += len(chunk)
            batch = _process_chunk(chunk, fmt, cfg, encoder, seen, stats, reject)
            if batch is not None:
                pending = pa.concat_tables([pending, pa.Table.from_batches([batch])])
            # Fixed-size row groups, so the file's bytes do not depend on tokenize.batch_rows.
            while pending.num_rows >= ROW_GROUP_ROWS:
                writer.write_table(pending.slice(0, ROW_GROUP_ROWS))
                pending = pending.slice(ROW_GROUP_ROWS)
            bar.update(len(chunk))
        if pending.num_rows:
            writer.write_table(pending)
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


def _process_chunk(chunk, fmt, cfg, encoder: _Tokenizer, seen, stats, reject) -> pa.RecordBatch | None:
    candidates = []  # (row, id, prompt_text, chosen_text, rejected_text)
    for row in chunk:
        if row.error:
            reject(row, row.error, row.detail)
            continue
        if detail := _row_too_large(row, cfg.data.max_row_bytes):
            reject(row, "row_too_large", detail)
            continue
        try:
            prompt, chosen, rejected = normalize(row.record, fmt, cfg)
            ex_id = example_id(prompt, chosen, rejected)
            if ex_id in seen:
                raise _Reject("duplicate", f"same as source row {seen[ex_id]}")
            texts = encoder.render(prompt, chosen, rejected)
        except _Reject as exc:
            reject(row, exc.reason, exc.detail)
            continue
        seen[ex_id] = row.source_row
        candidates.append((row, ex_id, *texts))
    if not candidates:
        return None
    rows, ids, prompts, chosens, rejecteds = (list(col) for col in zip(*candidates))
    prompt_ids, chosen_ids, rejected_ids, retokenized = encoder.tokenize(prompts, chosens, rejecteds)
    stats["retokenized"] += retokenized

    columns: dict[str, list] = {name: [] for name in EXAMPLES_SCHEMA.names}
    for i, row in enumerate(rows):
        try:
            p, c, r, p_cut, c_cut, r_cut = encoder.truncate(prompt_ids[i], chosen_ids[i], rejected_ids[i])
        except _Reject as exc:
            reject(row, exc.reason, exc.detail)
            continue
        split = split_of(ids[i], cfg.data.eval_fraction)
        values = (
            ids[i], split, row.source_row, prompts[i], chosens[i], rejecteds[i], p, c, r,
            len(p), len(c), len(r), p_cut, c_cut, r_cut,
        )
        for name, value in zip(EXAMPLES_SCHEMA.names, values):
            columns[name].append(value)
        stats["kept"] += 1
        stats[split] += 1
        stats["prompt_truncated"] += p_cut
        stats["chosen_truncated"] += c_cut
        stats["rejected_truncated"] += r_cut
        stats["prompt_tokens"] += len(p)
        stats["chosen_tokens"] += len(c)
        stats["rejected_tokens"] += len(r)
        stats["max_sequence"] = max(stats["max_sequence"], len(p) + max(len(c), len(r)))
    if not columns["id"]:
        return None
    return pa.RecordBatch.from_pydict(columns, schema=EXAMPLES_SCHEMA)
