"""The audit's drill-down: one example's prompt and response tokens with their cached reference
log-probs, coloured on a fixed scale, for the report's page and for `dpo audit show`.

    view = example_tokens(cache_dir, example_id, tokenizer)   # tokenizer None: token ids only
    view["chosen"]["tokens"][0]  # {"token": text, "id": token id, "logp": reference log-prob}

Part of the audit stage (tests/test_layering.py): it imports pipeline.audit.checks; pipeline.audit.report
and flows/ import it.
"""

from __future__ import annotations

import colorsys
import html
import math
from pathlib import Path

import polars as pl

from pipeline.audit.checks import dataset_dir_of, load_scores
from pipeline.config.schema import ModelConfig
from pipeline.models.loading import load_tokenizer, tokenizer_files
from pipeline.storage import paths, trust
from pipeline.store import MANIFEST, read_json

LOGP_SCALE = (-10.0, 0.0)
"""The fixed scale (nats) per-token log-probs are coloured on, in every report and terminal: red
at -10 or below, yellow at -5, green at 0."""
LOGP_LEGEND = tuple(LOGP_SCALE[0] + (LOGP_SCALE[1] - LOGP_SCALE[0]) * k / 5 for k in range(6))


def logp_color(logp: float | None) -> str:
    """The background (#rrggbb) of a token with this reference log-prob, on LOGP_SCALE; magenta
    when NaN or infinite, grey when the cache holds no per-token values."""
    if logp is None:
        return "#dddddd"
    if not math.isfinite(logp):
        return "#ff66ff"
    low, high = LOGP_SCALE
    share = min(max((logp - low) / (high - low), 0.0), 1.0)
    rgb = colorsys.hls_to_rgb(share / 3, 0.8, 0.75)  # hue 0 (red) to 1/3 (green), light
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def shown_token(token: dict) -> str:
    """A token's text as shown: newlines marked (↵); its id in angle brackets when not decoded."""
    if token["token"] is None:
        return f"⟨{token['id']}⟩"
    return token["token"].replace("\n", "↵\n")


def cache_tokenizer(cache_dir: str | Path, manifest: dict):
    """(tokenizer, note): the tokenizer the cache's dataset was prepared with, to decode token ids;
    (None, why) when it cannot be loaded or its files changed since. Never runs remote code."""
    dataset = read_json(dataset_dir_of(Path(cache_dir), manifest) / MANIFEST) or {}
    source = dataset.get("tokenizer_source") or manifest.get("model_source") or {}
    path = source.get("path") or manifest.get("model_path")
    if not path:
        return None, "the manifests name no tokenizer: token ids are shown"
    model = ModelConfig(path=path, revision=source.get("commit") or source.get("revision"))
    recorded = (dataset.get("inputs") or {}).get("tokenizer_files")
    try:
        if recorded is not None and tokenizer_files(model) != recorded:
            return None, f"the tokenizer files in {path} changed since the data was prepared: token ids are shown"
        return load_tokenizer(model), f"decoded with the tokenizer in {path}"
    except (OSError, ValueError) as exc:  # ModelError, or a Hub that cannot be reached
        return None, f"cannot load the tokenizer ({exc}): token ids are shown"


def token_view(example: dict, row: dict, tokenizer=None) -> dict:
    """An example (a row of examples.parquet) with its scores (a row of the cache): the prompt as
    the model saw it (decoded from its ids; prepare's text without a tokenizer) and each response's
    tokens, {"token": text (None without a tokenizer), "id", "logp": reference log-prob}."""

    def decode(ids: list[int]) -> str | None:
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False) if tokenizer is not None else None

    out = {"id": example["id"], "prompt": decode(example["prompt_ids"]) or example["prompt"],
           "prompt_tokens": len(example["prompt_ids"]), "prompt_truncated": bool(example.get("prompt_truncated"))}
    for side in ("chosen", "rejected"):
        ids = example[f"{side}_ids"]
        logps = row.get(f"{side}_token_logps") or [None] * len(ids)
        tokens = [{"token": decode([t]), "id": t, "logp": lp} for t, lp in zip(ids, logps)]
        out[side] = {"logp": row[f"{side}_logp"], "truncated": bool(example.get(f"{side}_truncated")),
                     "tokens": tokens}
    return out


def dataset_examples(dataset_dir: Path, ids: list[str]) -> list[dict]:
    """The rows of examples.parquet with these ids."""
    return pl.scan_parquet(dataset_dir / paths.EXAMPLES).filter(pl.col("id").is_in(ids)).collect().to_dicts()


def example_tokens(cache_dir: str | Path, example_id: str, tokenizer) -> dict:
    """An example's prompt and response tokens, each with its cached reference log-prob (see
    token_view; ``tokenizer`` None: token ids only)."""
    cache_dir = Path(cache_dir)
    manifest = trust.verified_refscores(cache_dir)
    scores = load_scores(cache_dir, manifest).filter(pl.col("id") == example_id)
    if scores.height == 0:
        raise KeyError(f"no example with id {example_id} in {cache_dir}")
    dataset_dir = dataset_dir_of(cache_dir, manifest)
    trust.verified_dataset(dataset_dir)
    return token_view(dataset_examples(dataset_dir, [example_id])[0], scores.row(0, named=True), tokenizer)


def tokens_html(tokens: list[dict], framed: set[int]) -> str:
    """A response's tokens as coloured spans (title: position, id, text, log-prob); ``framed``
    positions are outlined."""
    spans = []
    for i, token in enumerate(tokens):
        value = "no per-token value" if token["logp"] is None else f"{token['logp']:.4f} nats"
        text = f" {token['token']!r}" if token["token"] is not None else ""
        frame = " class='low'" if i in framed else ""
        tip = html.escape(f"#{i} id {token['id']}{text}: {value}")
        spans.append(f"<span{frame} style='background:{logp_color(token['logp'])}' title='{tip}'>"
                     f"{html.escape(shown_token(token))}</span>")
    return "<div class='tokens'>" + "".join(spans) + "</div>"


def legend_html() -> str:
    """The colour scale's legend, for the page above the examples."""
    cells = "".join(f"<span style='background:{logp_color(v)}'>{'≤' if v == LOGP_SCALE[0] else ''}{v:g}</span>"
                    for v in LOGP_LEGEND)
    return (f"<p class='legend'>Reference log-prob of each response token (nats): {cells} "
            f"<span style='background:{logp_color(math.nan)}'>NaN/inf</span> "
            f"<span style='background:{logp_color(None)}'>not stored</span>. Hover a token for its value; "
            "a framed token is in the lowest-log-prob table.</p>")
