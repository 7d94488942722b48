"""The prompts to sample from: each row read validated, rendered and tokenized, or rejected with its reason.

    reader = PromptReader(tokenizer, column="prompt", max_tokens=512)
    for chunk in chunks_of(rows, 1024):
        reader.add(chunk)              # RawRows from pipeline.data.read_rows
    table = reader.table()             # prompt_id, prompt, prompt_ids, source_row; sorted by prompt_id
    rejects = reader.rejects_table()   # source_row, reason, detail, raw

A prompt is a string (plain text, tokenized with the tokenizer's special tokens, e.g. BOS) or a
list of chat messages ``[{"role", "content"}, ...]`` (the chat template applied with the
generation prompt, then tokenized without special tokens: the template writes them), exactly as
the prepare stage renders the prompts of its pairs, so a completion sampled here continues the
very token ids a pair made of it will be scored after. Every row read is kept or rejected
(REJECT_REASONS); a prompt seen before is a ``duplicate``. Part of the generate stage.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import pyarrow as pa

from pipeline.data import RawRow
from pipeline.errors import GenerateError
from pipeline.store import canonical_json, fingerprint

REJECT_REASONS = ("malformed_json", "not_an_object", "missing_field", "empty_field", "wrong_type",
                  "chat_template_error", "duplicate", "too_long")
"""Why a row is not a prompt: unparsable (malformed_json, not_an_object, from pipeline.data),
the column absent or null in that row, an empty text or message list, a value that is neither a
string nor a list of {"role", "content"} strings, a chat template that fails on the messages, the
same prompt as an earlier row, more tokens than the limit."""

PROMPTS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("source_row", pa.int64()),
])

REJECTS_SCHEMA = pa.schema([
    ("source_row", pa.int64()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("raw", pa.string()),
])


@dataclass(frozen=True)
class Rejected:
    """Why a row is not a prompt: ``reason`` (one of REJECT_REASONS) and what was found."""

    reason: str
    detail: str


def prompt_id(prompt) -> str:
    """A prompt's id: the first 16 hex digits of the sha256 of its canonical JSON."""
    return fingerprint(prompt)[:16]


def chunks_of(rows: Iterable[RawRow], size: int) -> Iterator[list[RawRow]]:
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def check_prompt(record: dict, column: str):
    """The prompt of ``record`` (a string, or a list of chat messages), or why it is none."""
    value = record.get(column)
    if value is None:
        why = f"no {column!r} in this row" if column not in record else f"{column!r} is null"
        return Rejected("missing_field", why)
    if isinstance(value, str):
        return value if value.strip() else Rejected("empty_field", f"{column!r} is an empty text")
    if not isinstance(value, list):
        return Rejected("wrong_type", f"{column!r} is a {type(value).__name__}, not a text or a list of chat messages")
    if not value:
        return Rejected("empty_field", f"{column!r} is an empty list of messages")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return Rejected("wrong_type", f"{column!r}[{i}] is not a chat message (a role and a content, texts)")
    return value


def column_absent(rows: list[RawRow], column: str) -> str | None:
    """When no parsed row has ``column``: what the rows have instead (for the error: "its first
    row has: chosen, rejected"), else None."""
    first = None
    for row in rows:
        if row.record is None:
            continue
        if column in row.record:
            return None
        first = first if first is not None else row.record
    return f"its first row has: {', '.join(sorted(first))}" if first is not None else "no row is a JSON object"


@dataclass
class PromptReader:
    """Rows in, prompts kept (``kept``, by prompt id) and rejects out; the counts as it goes."""

    tokenizer: object
    column: str
    max_tokens: int
    user_turn: bool = False
    """generate.text_prompts user_turn: a text prompt becomes [{"role": "user", "content": text}]."""
    seen: dict[str, int] = field(default_factory=dict)
    kept: dict[str, list] = field(default_factory=lambda: {name: [] for name in PROMPTS_SCHEMA.names})
    rejects: dict[str, list] = field(default_factory=lambda: {name: [] for name in REJECTS_SCHEMA.names})
    stats: Counter = field(default_factory=Counter)

    def reject(self, row: RawRow, reason: str, detail: str) -> None:
        for name, value in zip(REJECTS_SCHEMA.names, (row.source_row, reason, detail, row.raw)):
            self.rejects[name].append(value)

    def add(self, chunk: list[RawRow]) -> None:
        """Validate, render and tokenize a chunk of rows (one tokenizer call per kind of prompt)."""
        self.stats["rows_read"] += len(chunk)
        texts: dict[bool, list[tuple[RawRow, object, str]]] = {False: [], True: []}
        for row in chunk:
            candidate = self._candidate(row)
            if isinstance(candidate, Rejected):
                self.reject(row, candidate.reason, candidate.detail)
                continue
            prompt, text = candidate
            texts[isinstance(prompt, list)].append((row, prompt, text))
        for chat, items in texts.items():
            if not items:
                continue
            ids = self.tokenizer([text for _, _, text in items], add_special_tokens=not chat,
                                 return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
            for (row, prompt, _), token_ids in zip(items, ids):
                self._keep(row, prompt, token_ids, chat)

    def _candidate(self, row: RawRow) -> tuple[object, str] | Rejected:
        """(prompt, its text to tokenize), or why the row is not a prompt."""
        if row.error:
            return Rejected(row.error, row.detail)
        prompt = check_prompt(row.record, self.column)
        if isinstance(prompt, Rejected):
            return prompt
        if self.user_turn and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        key = canonical_json(prompt)
        if key in self.seen:
            return Rejected("duplicate", f"same prompt as source row {self.seen[key]}")
        if not isinstance(prompt, list):
            return prompt, prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise GenerateError("the prompts are chat messages but the tokenizer has no chat template",
                                hint="use a model (model.path) with a chat template, or give the prompts as text")
        try:
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raises many types: all mean this template cannot render these messages
            return Rejected("chat_template_error", f"the chat template fails on these messages: {exc}")
        return prompt, text

    def _keep(self, row: RawRow, prompt, token_ids: list[int], chat: bool) -> None:
        key = canonical_json(prompt)
        if key in self.seen:  # the same prompt twice in one chunk
            self.reject(row, "duplicate", f"same prompt as source row {self.seen[key]}")
            return
        if len(token_ids) > self.max_tokens:
            self.reject(row, "too_long", f"{len(token_ids)} tokens, more than the limit of {self.max_tokens} "
                        "(tokenize.max_prompt_length, else tokenize.max_length - 1)")
            return
        self.seen[key] = row.source_row
        for name, value in zip(PROMPTS_SCHEMA.names, (prompt_id(prompt), key, token_ids, row.source_row)):
            self.kept[name].append(value)
        self.stats["kept"] += 1
        self.stats["chat"] += chat
        self.stats["tokens"] += len(token_ids)
        self.stats["max_tokens"] = max(self.stats["max_tokens"], len(token_ids))

    def table(self) -> pa.Table:
        """The kept prompts, sorted by prompt id (a deterministic shuffle of the source's order)."""
        table = pa.table(self.kept, schema=PROMPTS_SCHEMA)
        return table.sort_by([("prompt_id", "ascending")])

    def rejects_table(self) -> pa.Table:
        """The rejected rows, in source order."""
        return pa.table(self.rejects, schema=REJECTS_SCHEMA).sort_by([("source_row", "ascending")])

    def counts(self) -> dict:
        """rows_read, kept, rejected and rejected_by_reason; an internal check that they add up."""
        rejected = len(self.rejects["reason"])
        if self.stats["kept"] + rejected != self.stats["rows_read"]:  # never expected to fire
            raise GenerateError(f"accounting error: {self.stats['kept']} kept + {rejected} rejected != "
                                f"{self.stats['rows_read']} read")
        return {"rows_read": self.stats["rows_read"], "kept": self.stats["kept"], "rejected": rejected,
                "rejected_by_reason": dict(sorted(Counter(self.rejects["reason"]).items()))}
