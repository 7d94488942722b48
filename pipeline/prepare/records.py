"""The prepare stage's records: one input record validated and normalized, or rejected.

    prompt, chosen, rejected = normalize(record, "standard", cfg)   # or raises Reject(reason, detail)
    split_of(example_id(prompt, chosen, rejected), cfg.data.eval_fraction)  # "train" | "eval"

Every reason a row can be rejected for is in REJECT_REASONS (docs/reference/prepare.md documents
them). Part of the prepare stage (pipeline.prepare.stage is the only module that imports it).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from pipeline.config.schema import Config
from pipeline.errors import PrepareError
from pipeline.store import fingerprint

ID_HEX_CHARS = 16  # 64-bit content ids: collisions are negligible below ~1e8 examples

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
    "identical_after_truncation": "the two responses are the same tokens once cut to fit tokenize.max_length",
    "row_too_large": "the row is larger than data.max_row_bytes (rejected before tokenizing)",
}


class Reject(Exception):
    """A row the stage does not keep: ``reason`` is a key of REJECT_REASONS, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REJECT_REASONS, reason
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _text(record: dict, column: str) -> str:
    if column not in record or record[column] is None:
        raise Reject("missing_field", f"no {column!r}")
    value = record[column]
    if not isinstance(value, str):
        raise Reject("wrong_type", f"{column!r} is a {type(value).__name__}, expected text")
    if not value.strip():
        raise Reject("empty_field", f"{column!r} is empty")
    return value


def _messages(record: dict, column: str, response: bool) -> list[dict]:
    if column not in record or record[column] is None:
        raise Reject("missing_field", f"no {column!r}")
    value = record[column]
    if response and isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise Reject("wrong_type", f"{column!r} is a {type(value).__name__}, expected messages")
    if not value:
        raise Reject("empty_field", f"{column!r} has no messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise Reject("wrong_type", f"{column}[{i}] is not a {{role, content}} message")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise Reject("wrong_type", f"{column}[{i}] needs string role and content")
        messages.append({"role": role, "content": content})
    if response and not any(m["content"].strip() for m in messages):
        raise Reject("empty_field", f"{column!r} has no content")
    if not response and not any(m["content"].strip() for m in messages):
        raise Reject("empty_field", f"{column!r} has no content")
    return messages


def _split_implicit_text(chosen: str, rejected: str, marker: str) -> tuple[str, str, str]:
    # The last marker in chosen whose prefix rejected shares (str methods, no per-char loop).
    cut = chosen.rfind(marker)
    while cut >= 0 and not rejected.startswith(chosen[: cut + len(marker)]):
        cut = chosen.rfind(marker, 0, cut)
    if cut < 0:
        raise Reject("no_shared_prompt", f"no shared prefix ending in {marker!r}")
    end = cut + len(marker)
    prompt, chosen_response, rejected_response = chosen[:end], chosen[end:], rejected[end:]
    for name, response in (("chosen", chosen_response), ("rejected", rejected_response)):
        if not response.strip():
            raise Reject("empty_field", f"{name} response after the prompt is empty")
    return prompt, chosen_response, rejected_response


def _split_implicit_chat(chosen: list[dict], rejected: list[dict]):
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise Reject("wrong_type", f"{name} does not end with an assistant message")
        if len(conv) < 2:
            raise Reject("empty_field", f"{name} has no prompt before the final answer")
    if chosen[:-1] != rejected[:-1]:
        raise Reject("prompts_differ", "the turns before the final answer differ")
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
        raise Reject("chosen_equals_rejected", "")
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
