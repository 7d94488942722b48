"""Audit a reference cache: integrity, staleness, statistics, re-score drift, drill-down, report.

    report = audit(cache_dir, cfg=cfg, rescore_rows=8)   # or: dpo audit -c run.yaml --rescore 8
    report.passed, report.findings, report.stats

- integrity: the manifest against the files (every shard there, sha256 and row counts equal,
  completion flag set, no foreign or temporary files), ids unique and equal to the dataset's;
- staleness (with a config): fingerprints of what the config points to now (data file,
  tokenizer, settings, model config and weights, dtype) against what the cache was made from;
- statistics (polars): per-token and per-sequence log-probs, the reference margin, lengths,
  non-finite values (must be none), outliers with ids, the share of pairs the reference prefers;
- re-score: k seeded rows scored again with the transformers backend, in the very batches the
  scorer used (so the same backend, dtype and device give a difference of exactly 0), or in
  another dtype; per-token and per-sequence max/mean |diff| against the cache;
- report (``save_report``): JSON and one self-contained HTML page for someone deciding whether to
  trust the cache: what it was made from (model and commit, tokenizer, data, backend, dtype,
  versions), prepare's counts (truncations, rejects by reason with examples), the checks, the
  statistics, outliers linked to a token-by-token view of each (coloured by log-prob), plots.
"""

from __future__ import annotations

import colorsys
import html
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from . import __version__, layout, refvalues
from .config import Config, ModelConfig
from .data import DataError, resolve_input
from .layout import MANIFEST, SHARD_RE, CacheError
from .models import ModelError, load_tokenizer, tokenizer_files
from .run_report import png_base64
from .store import (atomic_write_json, atomic_write_text, ensure_dir, exclusive, read_json, remove_leftovers,
                    sha256_verified)


class AuditFailed(RuntimeError):
    """The audit found problems (they are in its report); the exit code says so."""


@dataclass
class Finding:
    check: str  # integrity | staleness | numerics | rescore
    ok: bool
    message: str


@dataclass
class AuditReport:
    cache_dir: str
    level: str = "quick"
    """quick: the cache alone; full: against a config (staleness, and re-score when asked)."""
    cache_fingerprint: str | None = None
    shards: dict = field(default_factory=dict)
    """sha256 of every shard file as the audit read it: the report is valid for these bytes only."""
    findings: list[Finding] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    rescore: dict | None = None
    created: str = field(default_factory=lambda: _utc(datetime.now(timezone.utc).timestamp()))
    """When the audit ran (UTC)."""

    @property
    def passed(self) -> bool:
        return all(f.ok for f in self.findings)

    def fail(self, check: str, message: str) -> None:
        self.findings.append(Finding(check, False, message))

    def ok(self, check: str, message: str) -> None:
        self.findings.append(Finding(check, True, message))

    def to_dict(self) -> dict:
        return {"cache_dir": self.cache_dir, "level": self.level, "cache_fingerprint": self.cache_fingerprint,
                "shards": self.shards, "passed": self.passed, "findings": [asdict(f) for f in self.findings],
                "stats": self.stats, "rescore": self.rescore, "created": self.created}


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def dataset_dir_of(cache_dir: Path, manifest: dict) -> Path:
    return layout.dataset_dir(layout.storage_of(cache_dir), manifest["inputs"]["dataset_fingerprint"])


# --- integrity ------------------------------------------------------------------------------------


def check_integrity(report: AuditReport, cache_dir: Path) -> dict | None:
    """Manifest vs files, and ids vs the dataset. Returns the manifest when every shard matches it
    (then, and only then, may the shards be read); every problem is a finding, never an exception."""
    manifest = read_json(cache_dir / MANIFEST)
    if manifest is None or manifest.get("kind") != "refscores":
        report.fail("integrity", f"{cache_dir} has no readable refscores {MANIFEST}")
        return None
    report.cache_fingerprint = manifest.get("fingerprint") if isinstance(manifest.get("fingerprint"), str) else None
    if manifest.get("complete") is not True:
        report.fail("integrity", "the manifest's completion flag is not set: scoring did not finish")
    try:
        listed = {s["file"]: s for s in layout.refscores_shards(manifest)}
    except CacheError as exc:
        report.fail("integrity", str(exc))
        return None
    intact = all([_check_shard(report, cache_dir / name, entry) for name, entry in listed.items()])
    for path in sorted(cache_dir.iterdir()):
        if path.name.startswith(".tmp-"):
            report.fail("integrity", f"temporary file {path.name} left by an interrupted write")
        elif path.name not in listed and path.name != MANIFEST:
            kind = "unlisted shard" if SHARD_RE.match(path.name) else "foreign file"
            report.fail("integrity", f"{kind} {path.name} in the cache directory")
    if sum(s["rows"] for s in listed.values()) != manifest.get("rows"):
        report.fail("integrity", "the shards' row counts do not add up to the manifest's rows")
    if not intact:
        return None
    try:
        ids = pl.concat([pl.read_parquet(cache_dir / name, columns=["id"]) for name in listed])["id"]
        _check_ids(report, cache_dir, manifest, ids)
    except (CacheError, OSError, KeyError, TypeError, pl.exceptions.PolarsError) as exc:
        report.fail("integrity", f"cannot read the cache's ids: {exc}")
        return None
    if all(f.ok for f in report.findings if f.check == "integrity"):
        report.ok("integrity", f"{len(listed)} shards, {len(ids)} rows: files, checksums and ids match")
    return manifest


def _check_shard(report: AuditReport, path: Path, entry: dict) -> bool:
    """Presence, sha256 and row count of one shard; its bytes are parsed only after the hash matched."""
    if not path.is_file():
        report.fail("integrity", f"shard {path.name} is missing")
        return False
    try:
        report.shards[path.name] = sha = sha256_verified(path)
    except OSError as exc:
        report.fail("integrity", f"shard {path.name} cannot be read ({exc})")
        return False
    if sha != entry["sha256"]:
        report.fail("integrity", f"shard {path.name}: sha256 differs from the manifest (the file changed)")
        return False
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for damaged files; all mean the same
        report.fail("integrity", f"shard {path.name} is not readable Parquet ({exc})")
        return False
    if rows != entry["rows"]:
        report.fail("integrity", f"shard {path.name}: {rows} rows, the manifest says {entry['rows']}")
        return False
    return _check_values(report, path)


def _check_values(report: AuditReport, path: Path) -> bool:
    """Page checksums and the value checksums written inside the shard (refvalues). A changed
    value is a failed finding, but its bytes are those the manifest lists: still read, so that
    the row checks can name the rows."""
    try:
        file = pq.ParquetFile(path, page_checksum_verification=True)
        table = file.read()
    except Exception as exc:  # a page whose CRC fails, or any other damage
        report.fail("integrity", f"shard {path.name}: a data page is damaged ({exc})")
        return False
    recorded = refvalues.recorded_digests(file.schema_arrow.metadata)
    if recorded is None:
        report.stats.setdefault("legacy_shards", []).append(path.name)
        return True
    try:
        refvalues.check_digests(table, recorded, f"shard {path.name}")
    except refvalues.ValueProofError as exc:
        report.fail("integrity", str(exc))
    return True


def _check_ids(report: AuditReport, cache_dir: Path, manifest: dict, ids: pl.Series) -> None:
    if ids.n_unique() != len(ids):
        report.fail("integrity", f"{len(ids) - ids.n_unique()} ids appear more than once")
    dataset_dir = dataset_dir_of(cache_dir, manifest)
    if not dataset_dir.exists():
        report.fail("integrity", f"the dataset it was scored on is gone ({dataset_dir})")
        return
    layout.verified_dataset(dataset_dir)
    dataset_ids = pl.read_parquet(dataset_dir / layout.EXAMPLES, columns=["id"])["id"]
    if not ids.equals(dataset_ids):
        missing = set(dataset_ids) - set(ids)
        report.fail("integrity", f"ids differ from the dataset's ({len(missing)} examples unscored)")


# --- staleness ------------------------------------------------------------------------------------


def check_staleness(report: AuditReport, cfg: Config, manifest: dict) -> None:
    """What the config points to now vs what the cache (and its dataset) were made from."""
    before = len(report.findings)
    try:
        _compare_sources(report, cfg, manifest)
    except (CacheError, DataError, ModelError, OSError, KeyError, TypeError) as exc:
        report.fail("staleness", f"cannot compare the cache with the config: {exc}")
    if len(report.findings) == before:
        report.ok("staleness", "data, tokenizer, settings and model match what the cache was made from")


def _compare_sources(report: AuditReport, cfg: Config, manifest: dict) -> None:
    from .data import input_sha256
    from .models import model_fingerprint, tokenizer_files

    dataset_manifest = read_json(dataset_dir_of(Path(report.cache_dir), manifest) / MANIFEST) or {}
    then = dataset_manifest.get("inputs") or {}
    if then:
        if layout.source_exists(cfg) and input_sha256(resolve_input(cfg.data, cfg.storage)) != then["data_sha256"]:
            report.fail("staleness", f"the data file changed since it was prepared ({cfg.data.path})")
        now_files, then_files = tokenizer_files(cfg.model), then["tokenizer_files"]
        for name in sorted(set(now_files) | set(then_files)):
            if now_files.get(name) != then_files.get(name):
                report.fail("staleness", f"tokenizer file {name} changed since the data was prepared")
        for group, current in (("data", layout.data_settings(cfg)), ("tokenize", layout.tokenize_settings(cfg))):
            for key, value in then[f"{group}_settings"].items():
                if current.get(key) != value:
                    report.fail("staleness", f"setting {group}.{key} was {value!r}, is {current.get(key)!r}")
    now_model, then_model = model_fingerprint(cfg.model), manifest["inputs"]["model"]
    if now_model["config_sha256"] != then_model["config_sha256"]:
        report.fail("staleness", "the model config changed since scoring (config.json)")
    for name in sorted(set(now_model["weights"]) | set(then_model["weights"])):
        if now_model["weights"].get(name) != then_model["weights"].get(name):
            report.fail("staleness", f"model weights changed since scoring ({name})")
    if cfg.model.dtype != manifest["inputs"]["dtype"]:
        report.fail("staleness", f"the cache was scored in {manifest['inputs']['dtype']}, the config says {cfg.model.dtype}")


# --- statistics -----------------------------------------------------------------------------------


def _describe(series: pl.Series) -> dict:
    finite = series.filter(series.is_finite())
    if len(finite) == 0:
        return {"count": 0}
    q = lambda p: float(finite.quantile(p, interpolation="linear"))  # noqa: E731
    return {"count": len(finite), "mean": float(finite.mean()), "std": float(finite.std() or 0.0),
            "min": float(finite.min()), "p01": q(0.01), "p50": q(0.5), "p99": q(0.99),
            "max": float(finite.max())}


def load_scores(cache_dir: Path, manifest: dict) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(cache_dir / s["file"]) for s in manifest["shards"]])


def token_frame(scores: pl.DataFrame) -> pl.DataFrame:
    """One row per response token of a cache with per-token values: id, side, position, logp."""
    return pl.concat([
        scores.select("id", pl.col(f"{side}_token_logps").alias("logp"), pl.lit(side).alias("side"))
        .with_columns(pl.int_ranges(pl.col("logp").list.len()).alias("position"))
        .explode("logp", "position")
        for side in ("chosen", "rejected")
    ])


def statistics(report: AuditReport, scores: pl.DataFrame, top: int = 10) -> None:
    has_tokens = "chosen_token_logps" in scores.columns
    margin = scores["chosen_logp"] - scores["rejected_logp"]
    stats = {
        "rows": scores.height,
        "sequence_logp": {"chosen": _describe(scores["chosen_logp"]), "rejected": _describe(scores["rejected_logp"])},
        "margin": _describe(margin),
        "reference_prefers_chosen": float((margin > 0).mean()),
        "lengths": {"chosen": _describe(scores["chosen_tokens"].cast(pl.Float64)),
                    "rejected": _describe(scores["rejected_tokens"].cast(pl.Float64))},
    }
    nonfinite = int((~scores["chosen_logp"].is_finite()).sum() + (~scores["rejected_logp"].is_finite()).sum())
    by_margin = scores.with_columns(margin.alias("margin")).sort(pl.col("margin").abs(), descending=True)
    stats["largest_abs_margin"] = by_margin.select("id", "margin").head(top).to_dicts()
    if has_tokens:
        tokens = token_frame(scores)
        nonfinite += int((~tokens["logp"].is_finite()).sum())
        stats["token_logp"] = _describe(tokens["logp"].cast(pl.Float64))
        stats["lowest_token_logps"] = tokens.sort("logp").head(top).to_dicts()
        sums_differ = scores.select(
            ((pl.col("chosen_token_logps").list.sum().cast(pl.Float64) - pl.col("chosen_logp")).abs().max()).alias("d")
        )["d"][0]
        stats["max_token_sum_vs_sequence_diff"] = float(sums_differ) if sums_differ is not None else None
    stats["nonfinite_values"] = nonfinite
    report.stats.update(stats)
    if nonfinite:
        bad = scores.filter(~scores["chosen_logp"].is_finite() | ~scores["rejected_logp"].is_finite())["id"].to_list()
        report.fail("numerics", f"{nonfinite} NaN or infinite log-probs (e.g. ids {', '.join(bad[:3]) or 'in per-token values'})")
    else:
        report.ok("numerics", "no NaN or infinite log-probs")


# --- rows -----------------------------------------------------------------------------------------

ROWS_LISTED = 20
"""How many failing rows the report lists (all are counted, and all are re-scored)."""


def check_rows(report: AuditReport, cache_dir: Path, manifest: dict, scores: pl.DataFrame) -> list[int]:
    """Every row's consistency that needs no model (refvalues.row_problems: finite, within its
    token count's bounds, one per-token value per token, sequence value = sum of per-token
    values) and its token counts against the dataset's. Returns the failing rows' positions."""
    import time

    started = time.perf_counter()
    problems = refvalues.row_problems(scores.to_arrow())
    dataset = pl.read_parquet(dataset_dir_of(cache_dir, manifest) / layout.EXAMPLES,
                              columns=["id", "chosen_tokens", "rejected_tokens"])
    ids = scores["id"]
    for side in refvalues.SIDES:
        differs = (scores[f"{side}_tokens"].cast(pl.Int64) != dataset[f"{side}_tokens"].cast(pl.Int64)).arg_true()
        problems += [refvalues.RowProblem(i, ids[i], side, f"{scores[f'{side}_tokens'][i]} tokens, the dataset has "
                                          f"{dataset[f'{side}_tokens'][i]}") for i in differs.to_list()]
    problems.sort(key=lambda p: (p.row, p.side))
    starts = [(s["first_row"], s["file"]) for s in manifest["shards"] if isinstance(s.get("first_row"), int)]
    listed = []
    for problem in problems[:ROWS_LISTED]:
        shard = next((name for first, name in reversed(starts) if first <= problem.row), "?")
        listed.append({"row": problem.row, "id": problem.id, "shard": shard, "side": problem.side,
                       "problem": problem.problem})
    failed = sorted({p.row for p in problems})
    report.stats["row_checks"] = {"rows": scores.height, "failed_rows": len(failed), "failures": listed,
                                  "seconds": round(time.perf_counter() - started, 4)}
    if failed:
        shown = "; ".join(f"id {f['id']} in {f['shard']} ({f['side']}: {f['problem']})" for f in listed[:3])
        report.fail("rows", f"{len(failed)} of {scores.height} rows fail the checks that need no model: {shown}"
                    + (" ..." if len(problems) > 3 else ""))
    else:
        report.ok("rows", f"all {scores.height} rows consistent: finite, within their token counts' bounds, "
                  "sequence values equal to their per-token sums where stored, token counts as the dataset's")
    return failed


# --- re-score -------------------------------------------------------------------------------------


def rescore_check(report: AuditReport, cfg: Config, cache_dir: Path, manifest: dict, scores: pl.DataFrame,
                  rows: int, seed: int = 0, dtype: str | None = None, tolerance: float | None = None,
                  failed: list[int] = ()) -> None:
    """Re-score ``rows`` seeded examples with transformers, in the cache's own batches (so the same
    backend, dtype and settings reproduce identical bits); compare with the cache. The rows that
    failed the row checks (``failed``) are always re-scored too."""
    import dataclasses

    from .scorers import make_scorer

    inputs = manifest["inputs"]
    model_cfg = dataclasses.replace(cfg.model, dtype=dtype or inputs["dtype"])
    examples = pl.read_parquet(dataset_dir_of(cache_dir, manifest) / layout.EXAMPLES,
                               columns=["id", "prompt_ids", "chosen_ids", "rejected_ids"])
    scorer = make_scorer("transformers", dataclasses.replace(cfg, model=model_cfg), 0, manifest.get("settings"))
    rng = np.random.default_rng(seed)
    sample = rng.choice(examples.height, size=min(rows, examples.height), replace=False).tolist()
    picked = sorted(set(sample) | set(failed))
    shard_rows = inputs["shard_rows"]
    token_diffs, seq_diffs, seq_per_token = [], [], []
    for shard_index in sorted({i // shard_rows for i in picked}):
        start = shard_index * shard_rows
        part = examples.slice(start, shard_rows)
        local = [i - start for i in picked if start <= i < start + shard_rows]
        token_ids = [part[f"{name}_ids"].to_list() for name in ("prompt", "chosen", "rejected")]
        chosen, rejected = scorer.score_pairs(*token_ids, rows=local)
        for i in local:
            cached = scores.row(start + i, named=True)
            for side, values in (("chosen", chosen[i]), ("rejected", rejected[i])):
                seq_diffs.append(abs(float(np.sum(values, dtype=np.float64)) - cached[f"{side}_logp"]))
                seq_per_token.append(seq_diffs[-1] / max(len(values), 1))
                if cached.get(f"{side}_token_logps") is not None:
                    kept = np.asarray(cached[f"{side}_token_logps"], np.float32)
                    token_diffs.append(np.abs(values - kept) if kept.shape == values.shape else np.array([np.inf]))
    del scorer
    tokens = np.concatenate(token_diffs) if token_diffs else np.zeros(0)
    limit = tolerance if tolerance is not None else layout.logprob_tolerance(
        (model_cfg.dtype, inputs["dtype"]), inputs["backend"])
    result = {"rows": len(picked), "ids": examples["id"].gather(picked).to_list(), "dtype": model_cfg.dtype,
              "token_max": float(tokens.max()) if tokens.size else None,
              "token_mean": float(tokens.mean()) if tokens.size else None,
              "seq_max": float(max(seq_diffs)), "seq_mean": float(np.mean(seq_diffs)), "tolerance": limit}
    report.rescore = result
    # A sequence value is held to the per-token tolerance per token of its response: a cached sum
    # that disagrees with its own (matching) per-token values fails too.
    worst = max(result["token_max"] or 0.0, float(np.max(seq_per_token)))
    text = (f"re-scored {len(picked)} rows with transformers/{model_cfg.dtype}: per-token max |diff| "
            f"{result['token_max']}, per-sequence max |diff| {result['seq_max']:.3g} (tolerance {limit:g})")
    (report.ok if worst <= limit else report.fail)("rescore", text)


# --- the audit ------------------------------------------------------------------------------------


def audit(cache_dir: str | Path, cfg: Config | None = None, rescore_rows: int = 0, seed: int = 0,
          dtype: str | None = None, tolerance: float | None = None) -> AuditReport:
    """Audit a cache. Never raises on damaged input: every problem becomes a failed finding."""
    cache_dir = Path(cache_dir)
    report = AuditReport(str(cache_dir), level="full" if cfg is not None else "quick")
    if not cache_dir.is_dir():
        report.fail("integrity", f"{cache_dir} is not a folder")
        return report
    manifest = check_integrity(report, cache_dir)
    if manifest is not None and cfg is not None:
        check_staleness(report, cfg, manifest)
    if manifest is None:
        return report
    try:
        scores = load_scores(cache_dir, manifest)
        statistics(report, scores)
        failed = check_rows(report, cache_dir, manifest, scores)
    except (OSError, pl.exceptions.PolarsError) as exc:
        report.fail("numerics", f"cannot read the scores: {exc}")
        return report
    if rescore_rows and cfg is not None:
        rescore_check(report, cfg, cache_dir, manifest, scores, rescore_rows, seed, dtype, tolerance, failed)
    return report


def diff_caches(a: str | Path, b: str | Path) -> dict:
    """Row-by-row comparison of two caches of the same dataset (e.g. vllm vs transformers)."""
    a, b = Path(a), Path(b)
    ma, mb = layout.verified_refscores(a), layout.verified_refscores(b)
    if ma["inputs"]["dataset_fingerprint"] != mb["inputs"]["dataset_fingerprint"]:
        raise CacheError("the two caches were scored on different datasets: nothing to compare row by row")
    left, right = load_scores(a, ma), load_scores(b, mb)
    joined = left.join(right, on="id", suffix="_b")
    out = {"rows": joined.height, "a": {k: ma["inputs"][k] for k in ("backend", "dtype")},
           "b": {k: mb["inputs"][k] for k in ("backend", "dtype")}}
    for side in ("chosen", "rejected"):
        seq = (joined[f"{side}_logp"] - joined[f"{side}_logp_b"]).abs()
        out[f"{side}_seq_max"], out[f"{side}_seq_mean"] = float(seq.max()), float(seq.mean())
        if f"{side}_token_logps" in joined.columns and f"{side}_token_logps_b" in joined.columns:
            diff = pl.col(f"{side}_token_logps").explode() - pl.col(f"{side}_token_logps_b").explode()
            tok = joined.select(diff.abs().alias("d"))["d"]
            out[f"{side}_token_max"], out[f"{side}_token_mean"] = float(tok.max()), float(tok.mean())
        out[f"{side}_token_counts_equal"] = bool((joined[f"{side}_tokens"] == joined[f"{side}_tokens_b"]).all())
    gap = (pl.col("chosen_logp") - pl.col("chosen_logp_b")).abs().alias("d")
    out["largest_chosen_diffs"] = joined.with_columns(gap).sort("d", descending=True).select("id", "d").head(5).to_dicts()
    return out


# --- drill-down: one example, token by token --------------------------------------------------------

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


def _examples(dataset_dir: Path, ids: list[str]) -> list[dict]:
    """The rows of examples.parquet with these ids."""
    return pl.scan_parquet(dataset_dir / layout.EXAMPLES).filter(pl.col("id").is_in(ids)).collect().to_dicts()


def example_tokens(cache_dir: str | Path, example_id: str, tokenizer) -> dict:
    """An example's prompt and response tokens, each with its cached reference log-prob (see
    token_view; ``tokenizer`` None: token ids only)."""
    cache_dir = Path(cache_dir)
    manifest = layout.verified_refscores(cache_dir)
    scores = load_scores(cache_dir, manifest).filter(pl.col("id") == example_id)
    if scores.height == 0:
        raise KeyError(f"no example with id {example_id} in {cache_dir}")
    dataset_dir = dataset_dir_of(cache_dir, manifest)
    layout.verified_dataset(dataset_dir)
    return token_view(_examples(dataset_dir, [example_id])[0], scores.row(0, named=True), tokenizer)


# --- report ---------------------------------------------------------------------------------------

NOT_RECORDED = "not recorded"
EXAMPLES_SHOWN = 10
"""How many outliers the report shows token by token."""
FIGSIZE = (11, 5)  # inches at png_base64's 90 dpi: about 950 px wide, one plot per row


@dataclass
class ReportSources:
    """What the report shows beside the audit's results: the cache's and its dataset's manifests,
    rejected rows, the outliers token by token. Only files whose checksums match are read."""

    manifest: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    """prepare's manifest."""
    cache_written: str | None = None
    rejects: dict[str, list[dict]] = field(default_factory=dict)
    """reason -> up to 3 rejected rows (source_row, detail, raw cut short, cut)."""
    examples: list[dict] = field(default_factory=list)
    """token_view of each outlier shown."""
    decoded: str = ""
    """How the examples' tokens were decoded, or why they were not."""


def outlier_ids(stats: dict, limit: int = EXAMPLES_SHOWN) -> list[str]:
    """Ids of the outlier tables (lowest per-token log-probs, largest |margin|), alternating, once each."""
    lists = [[row["id"] for row in stats.get(key) or []] for key in ("lowest_token_logps", "largest_abs_margin")]
    ids = dict.fromkeys(i for pair in itertools.zip_longest(*lists) for i in pair if i is not None)
    return list(ids)[:limit]


def reject_examples(dataset_dir: Path, per_reason: int = 3, chars: int = 300) -> dict[str, list[dict]]:
    """Up to ``per_reason`` rejected rows of each reason: source row, detail, the raw line cut short."""
    rejects = pl.read_parquet(dataset_dir / layout.REJECTS, columns=["source_row", "reason", "detail", "raw"])
    shown = rejects.group_by("reason", maintain_order=True).head(per_reason).with_columns(
        (pl.col("raw").str.len_chars() > chars).alias("cut"), pl.col("raw").str.slice(0, chars))
    out: dict[str, list[dict]] = {}
    for row in shown.to_dicts():
        out.setdefault(row.pop("reason"), []).append(row)
    return out


def report_sources(report: AuditReport, scores: pl.DataFrame | None) -> ReportSources:
    """Read what the report shows beside the audit; what cannot be trusted is left out (the
    checks say why)."""
    cache_dir = Path(report.cache_dir)
    sources = ReportSources()
    manifest = read_json(cache_dir / MANIFEST)
    if manifest is None:
        return sources
    sources.manifest = manifest
    sources.cache_written = _utc((cache_dir / MANIFEST).stat().st_mtime)
    if not isinstance((manifest.get("inputs") or {}).get("dataset_fingerprint"), str):
        return sources
    dataset_dir = dataset_dir_of(cache_dir, manifest)
    if not layout.is_verified(layout.verified_dataset, dataset_dir):
        return sources
    sources.dataset = read_json(dataset_dir / MANIFEST) or {}
    sources.rejects = reject_examples(dataset_dir)
    ids = outlier_ids(report.stats)
    if scores is not None and ids:
        tokenizer, sources.decoded = cache_tokenizer(cache_dir, manifest)
        rows = {row["id"]: row for row in scores.filter(pl.col("id").is_in(ids)).to_dicts()}
        examples = {example["id"]: example for example in _examples(dataset_dir, ids)}
        sources.examples = [token_view(examples[i], rows[i], tokenizer) for i in ids if i in examples and i in rows]
    return sources


def plots(scores: pl.DataFrame) -> dict[str, str]:
    """Base64 PNGs: log-prob histogram, margin histogram, per-token log-prob by response position
    (mean and 10-90th percentile band; without per-token values, a histogram of log-prob per token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = None
    if "chosen_token_logps" in scores.columns:
        tokens = token_frame(scores).drop_nulls("logp").filter(pl.col("logp").is_finite())
    images = {}

    def add(title: str, fig) -> None:
        fig.axes[0].set_title(title)
        images[title] = png_base64(fig)
        plt.close(fig)

    with plt.rc_context({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3}):
        fig, ax = plt.subplots(figsize=FIGSIZE)
        for side in ("chosen", "rejected"):
            values = (tokens.filter(pl.col("side") == side)["logp"] if tokens is not None
                      else scores[f"{side}_logp"].filter(scores[f"{side}_logp"].is_finite()))
            ax.hist(values.to_numpy(), bins=60, alpha=0.6, label=side)
        ax.set_xlabel(f"{'per-token' if tokens is not None else 'sequence'} reference log-prob (nats)")
        ax.set_ylabel("count")
        ax.legend()
        add("Log-prob histogram", fig)
        fig, ax = plt.subplots(figsize=FIGSIZE)
        margin = scores["chosen_logp"] - scores["rejected_logp"]
        ax.hist(margin.filter(margin.is_finite()).to_numpy(), bins=60, color="tab:green")
        ax.axvline(0, color="black", lw=1)
        ax.set_xlabel("reference margin: log pi_ref(chosen) - log pi_ref(rejected) (nats)")
        ax.set_ylabel("pairs")
        add("Margin histogram", fig)
        fig, ax = plt.subplots(figsize=FIGSIZE)
        if tokens is not None:
            least = min(5, scores.height)  # positions fewer responses reach would be noise
            for side in ("chosen", "rejected"):
                logp = pl.col("logp")
                at = (tokens.filter(pl.col("side") == side).group_by("position")
                      .agg(pl.len().alias("n"), logp.mean().alias("mean"), logp.quantile(0.1, "linear").alias("p10"),
                           logp.quantile(0.9, "linear").alias("p90"))
                      .filter(pl.col("n") >= least).sort("position"))
                (line,) = ax.plot(at["position"].to_numpy(), at["mean"].to_numpy(), lw=1.8, label=f"{side}: mean")
                ax.fill_between(at["position"].to_numpy(), at["p10"].to_numpy(), at["p90"].to_numpy(),
                                color=line.get_color(), alpha=0.2, label=f"{side}: 10th-90th percentile")
            ax.set_xlabel(f"response token position (0: first; positions at least {least} responses reach)")
            ax.set_ylabel("reference log-prob (nats)")
            ax.legend()
            add("Per-token log-prob by position", fig)
        else:
            for side in ("chosen", "rejected"):
                per_token = scores[f"{side}_logp"] / scores[f"{side}_tokens"]
                ax.hist(per_token.filter(per_token.is_finite()).to_numpy(), bins=60, alpha=0.6, label=side)
            ax.set_xlabel("sequence log-prob / response tokens (nats per token)")
            ax.set_ylabel("responses")
            ax.legend()
            add("Log-prob per token (the cache holds no per-token values)", fig)
    return images


def _short(sha) -> str:
    return sha[:12] if isinstance(sha, str) else NOT_RECORDED


def _source_text(source: dict) -> str:
    """A model or data source as recorded: a path, or a Hub id with the revision asked and the commit."""
    if source.get("hub_id"):
        split = f"split {source['split']}, " if source.get("split") else ""
        return (f"{source['hub_id']} ({split}revision {source.get('revision') or 'main'}, "
                f"commit {source.get('commit') or NOT_RECORDED})")
    return str(source.get("path") or NOT_RECORDED)


def _versions(versions) -> str:
    return ", ".join(f"{name} {v}" for name, v in versions.items()) if isinstance(versions, dict) else NOT_RECORDED


def header_rows(report: AuditReport, sources: ReportSources) -> list[tuple[str, str]]:
    """What the cache was made from and with, as its manifests record it ("not recorded" where not)."""
    m, d = sources.manifest, sources.dataset
    inputs, settings = m.get("inputs") or {}, m.get("settings") or {}
    model = inputs.get("model") or {}
    weights = "; ".join(f"{name} {_short(sha)}" for name, sha in (model.get("weights") or {}).items())
    rows = [
        ("cache", f"{report.cache_dir} (fingerprint {_short(report.cache_fingerprint)})"),
        ("model", _source_text(m.get("model_source") or {"path": m.get("model_path")})),
        ("model content (sha256)",
         f"config.json {_short(model.get('config_sha256'))}; {weights or 'weights ' + NOT_RECORDED}"),
    ]
    if d:
        files = (d.get("inputs") or {}).get("tokenizer_files") or {}
        contract, source = d.get("contract") or {}, d.get("source") or {}
        chat = "chat template applied" if d.get("chat_template_applied") else "plain text (no chat template)"
        vocab, data_sha = contract.get("vocab_size", NOT_RECORDED), (d.get("inputs") or {}).get("data_sha256")
        rows += [
            ("tokenizer", f"{_source_text(d.get('tokenizer_source') or {})}: tokenizer.json "
                          f"{_short(files.get('tokenizer.json'))}, {vocab} tokens, {chat}"),
            ("dataset", f"{_source_text(source.get('hub') or source)} (file sha256 {_short(data_sha)}, "
                        f"format {d.get('format', NOT_RECORDED)}); prepared as {_short(d.get('fingerprint'))}"),
        ]
    else:
        rows += [("tokenizer", NOT_RECORDED + " (the dataset's manifest cannot be read)"),
                 ("dataset", f"{_short(inputs.get('dataset_fingerprint'))} (its manifest cannot be read)")]
    stored = {True: "stored", False: "not stored (sequence sums only)"}.get(inputs.get("store_token_logps"),
                                                                          NOT_RECORDED)
    how = (inputs.get("backend"), inputs.get("dtype"), settings.get("device"))
    rows += [
        ("rows scored", str(m.get("rows", NOT_RECORDED))),
        ("backend / dtype / device", " / ".join(NOT_RECORDED if v is None else str(v) for v in how)),
        ("scorer settings", ", ".join(f"{k}={v}" for k, v in settings.items() if k != "device") or NOT_RECORDED),
        ("per-token log-probs", stored),
        ("versions (score)", _versions(m.get("versions"))),
    ]
    if d and d.get("versions") != m.get("versions"):
        rows.append(("versions (prepare)", _versions(d.get("versions"))))
    written = NOT_RECORDED
    if sources.cache_written:
        written = f"{sources.cache_written} (time of the manifest file: no date is recorded)"
    rows += [("cache written", written),
             ("audit", f"{report.created}, level {report.level}, dpo_pipeline {__version__}")]
    return rows


def _share(n, of) -> str:
    if not isinstance(n, int):
        return NOT_RECORDED
    return f"{n} ({n / of:.1%})" if of else str(n)


def _prepare_html(sources: ReportSources) -> list[str]:
    esc = html.escape
    counts, d = sources.dataset.get("counts"), sources.dataset
    parts = ["<h2 id='prepare'>Prepare</h2>"]
    if not counts:
        return parts + ["<p>The prepared dataset's manifest cannot be read (see the checks).</p>"]
    read, kept = counts.get("rows_read"), counts.get("kept")
    cut = (d.get("contract") or {}).get("truncation") or {}
    rows = [("rows read", str(read)),
            ("kept", f"{_share(kept, read)}: {counts.get('train')} train, {counts.get('eval')} eval"),
            ("rejected", _share(counts.get("rejected"), read)),
            ("prompts truncated", _share(counts.get("prompt_truncated"), kept)),
            ("chosen responses truncated", _share(counts.get("chosen_truncated"), kept)),
            ("rejected responses truncated", _share(counts.get("rejected_truncated"), kept)),
            ("truncation", ", ".join(f"{k} {v}" for k, v in cut.items()) or NOT_RECORDED)]
    if d.get("chat_template_applied"):
        rows.append(("chat boundary re-tokenized", str(counts.get("chat_boundary_retokenized", NOT_RECORDED))))
    parts.append("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>")
    by_reason = counts.get("rejected_by_reason") or {}
    if by_reason:
        parts.append("<h3>Rejects by reason</h3><table><tr><th>reason</th><th>rows</th><th>examples</th></tr>")
        for reason, n in by_reason.items():
            shown = "".join(f"<div>source row {r['source_row']}: {esc(r['detail'] or '')} "
                            f"<code>{esc(r['raw'])}{'…' if r['cut'] else ''}</code></div>"
                            for r in sources.rejects.get(reason, []))
            parts.append(f"<tr><td>{esc(reason)}</td><td>{n}</td><td>{shown}</td></tr>")
        parts.append("</table>")
    return parts


def _why_shown(stats: dict) -> dict[str, list[str]]:
    """id -> why the example is an outlier (a line per table entry)."""
    why: dict[str, list[str]] = {}
    for row in stats.get("lowest_token_logps") or []:
        why.setdefault(row["id"], []).append(f"{row['side']} token {row['position']}: log-prob {row['logp']:.3f}")
    for row in stats.get("largest_abs_margin") or []:
        why.setdefault(row["id"], []).append(f"margin {row['margin']:.3f}, among the largest |margin|")
    return why


def _tokens_html(tokens: list[dict], framed: set[int]) -> str:
    spans = []
    for i, token in enumerate(tokens):
        value = "no per-token value" if token["logp"] is None else f"{token['logp']:.4f} nats"
        text = f" {token['token']!r}" if token["token"] is not None else ""
        frame = " class='low'" if i in framed else ""
        tip = html.escape(f"#{i} id {token['id']}{text}: {value}")
        spans.append(f"<span{frame} style='background:{logp_color(token['logp'])}' title='{tip}'>"
                     f"{html.escape(shown_token(token))}</span>")
    return "<div class='tokens'>" + "".join(spans) + "</div>"


def _legend_html() -> str:
    cells = "".join(f"<span style='background:{logp_color(v)}'>{'≤' if v == LOGP_SCALE[0] else ''}{v:g}</span>"
                    for v in LOGP_LEGEND)
    return (f"<p class='legend'>Reference log-prob of each response token (nats): {cells} "
            f"<span style='background:{logp_color(math.nan)}'>NaN/inf</span> "
            f"<span style='background:{logp_color(None)}'>not stored</span>. Hover a token for its value; "
            "a framed token is in the lowest-log-prob table.</p>")


def _examples_html(stats: dict, sources: ReportSources) -> list[str]:
    esc = html.escape
    parts = ["<h2 id='examples'>Examples</h2>"]
    if not sources.examples:
        return parts + ["<p>No examples to show (the outliers' data cannot be read).</p>"]
    parts += [f"<p>The outliers, token by token: {esc(sources.decoded)}.</p>", _legend_html()]
    why = _why_shown(stats)
    framed: dict[tuple, set[int]] = {}
    for row in stats.get("lowest_token_logps") or []:
        framed.setdefault((row["id"], row["side"]), set()).add(row["position"])
    for view in sources.examples:
        margin = view["chosen"]["logp"] - view["rejected"]["logp"]
        parts.append(f"<details id='example-{esc(view['id'])}'><summary><b>{esc(view['id'])}</b>: "
                     f"{esc('; '.join(why.get(view['id'], [])))}</summary>")
        truncated = ", truncated" if view["prompt_truncated"] else ""
        parts.append(f"<p>reference margin (chosen - rejected): {margin:.3f} nats</p>"
                     f"<h4>prompt ({view['prompt_tokens']} tokens{truncated})</h4>"
                     f"<div class='text'>{esc(view['prompt'])}</div>")
        for side in ("chosen", "rejected"):
            shown = view[side]
            truncated = ", truncated" if shown["truncated"] else ""
            parts.append(f"<h4>{side}: log pi_ref = {shown['logp']:.3f} nats over {len(shown['tokens'])} tokens"
                         f"{truncated}</h4>" + _tokens_html(shown["tokens"], framed.get((view["id"], side), set())))
        parts.append("</details>")
    return parts


STYLE = (
    "body{font-family:sans-serif;margin:2em auto;max-width:1100px;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
    "text-align:left;vertical-align:top;overflow-wrap:anywhere}.fail{color:#b00}.ok{color:#070}nav a{margin-right:1em}"
    "img{display:block;max-width:100%;margin:1em 0}code{white-space:pre-wrap;word-break:break-all;color:#555}"
    "details{border:1px solid #ccc;border-radius:4px;margin:.5em 0;padding:.3em .8em}details[open]{background:#fafafa}"
    ".tokens,.text{white-space:pre-wrap;font-family:monospace;line-height:1.8;padding:.5em;border:1px solid #ddd;"
    "background:#fff;max-height:30em;overflow:auto}"
    ".tokens span{border-radius:2px;box-shadow:inset -1px 0 0 rgba(0,0,0,.25)}.tokens span.low{outline:2px solid #000}"
    ".legend span{font-family:monospace;padding:0 .6em}"
)
# Opens the example a link or the address's #example-<id> points to (on load and when it changes).
OPEN_EXAMPLE = (
    "<script>function openExample(){var el=document.getElementById(decodeURIComponent(location.hash.slice(1)));"
    "if(el&&el.tagName==='DETAILS'){el.open=true;}}"
    "addEventListener('hashchange',openExample);openExample();</script>"
)
SECTIONS = ("header", "checks", "prepare", "statistics", "outliers", "plots", "examples")


def write_html(report: AuditReport, scores: pl.DataFrame | None, path: Path,
               sources: ReportSources | None = None) -> Path:
    esc = html.escape
    sources = sources or ReportSources()
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>dpo-pipeline audit</title><style>{STYLE}</style>"
        "</head><body>",
        f"<h1>Audit of {esc(Path(report.cache_dir).name[:16])}</h1>",
        f"<p>{esc(report.cache_dir)}: <b class='{'ok' if report.passed else 'fail'}'>"
        f"{'PASSED' if report.passed else 'FAILED'}</b></p>",
        "<nav>" + "".join(f"<a href='#{s}'>{s.capitalize()}</a>" for s in SECTIONS) + "</nav>",
        "<h2 id='header'>Header</h2><table>",
    ]
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in header_rows(report, sources)]
    parts.append("</table><h2 id='checks'>Checks</h2><table><tr><th>check</th><th>result</th><th>detail</th></tr>")
    for f in report.findings:
        parts.append(f"<tr><td>{esc(f.check)}</td><td class='{'ok' if f.ok else 'fail'}'>"
                     f"{'ok' if f.ok else 'FAIL'}</td><td>{esc(f.message)}</td></tr>")
    parts.append("</table>")
    if report.rescore:
        parts.append(f"<h3>Re-score</h3><pre>{esc(json.dumps(report.rescore, indent=1))}</pre>")
    parts += _prepare_html(sources)
    st = report.stats
    if st:
        parts.append("<h2 id='statistics'>Statistics</h2><table>")
        scalars = {"rows": st["rows"], "NaN/inf values": st["nonfinite_values"],
                   "pairs the reference already prefers": f"{st['reference_prefers_chosen']:.1%}",
                   "max |sum of per-token - sequence| (nats)": st.get("max_token_sum_vs_sequence_diff")}
        for key, value in scalars.items():
            parts.append(f"<tr><th>{esc(key)}</th><td>{esc(str(value))}</td></tr>")
        columns = ("count", "mean", "std", "min", "p01", "p50", "p99", "max")
        parts.append("</table><h3>Distributions</h3><table><tr><th>quantity</th>"
                     + "".join(f"<th>{c}</th>" for c in columns) + "</tr>")
        rows = [("per-token log-prob", st.get("token_logp")),
                ("chosen log-prob", st["sequence_logp"]["chosen"]), ("rejected log-prob", st["sequence_logp"]["rejected"]),
                ("margin (chosen - rejected)", st["margin"]),
                ("chosen tokens", st["lengths"]["chosen"]), ("rejected tokens", st["lengths"]["rejected"])]
        for name, d in rows:
            if d:
                cells = "".join(f"<td>{d[c]:.4g}</td>" if c in d else "<td></td>" for c in columns)
                parts.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
        parts.append("</table><h2 id='outliers'>Outliers</h2><p>Each id opens its example, token by token.</p>")
        linked = {view["id"] for view in sources.examples}
        for title, key, fields in (("Lowest per-token log-probs", "lowest_token_logps", ("id", "side", "position", "logp")),
                                   ("Largest |margin|", "largest_abs_margin", ("id", "margin"))):
            if st.get(key):
                parts.append(f"<h3>{title}</h3><table><tr>" + "".join(f"<th>{f}</th>" for f in fields) + "</tr>")
                for row in st[key]:
                    cells = [esc(str(row[f])) for f in fields]
                    if row["id"] in linked:
                        cells[0] = f"<a href='#example-{cells[0]}'>{cells[0]}</a>"
                    parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
                parts.append("</table>")
    if scores is not None:
        parts.append("<h2 id='plots'>Plots</h2>")
        for title, data in plots(scores).items():
            parts.append(f"<img alt='{esc(title)}' title='{esc(title)}' src='data:image/png;base64,{data}'>")
    if st:
        parts += _examples_html(st, sources)
    parts.append(OPEN_EXAMPLE + "</body></html>")
    atomic_write_text(path, "\n".join(parts))
    return path


def report_dir(report: AuditReport) -> Path:
    """<storage>/audits/<cache fingerprint>/: the report lives apart from the (read-only) cache."""
    name = report.cache_fingerprint or Path(report.cache_dir).name
    return layout.audit_dir(layout.storage_of(report.cache_dir), name)


def save_report(report: AuditReport, directory: str | Path | None = None) -> Path:
    """<level>.json and <level>.html (level quick or full) in ``directory`` (default: the
    storage's audits/<cache fingerprint>/); returns the HTML file. A quick audit never replaces
    a full one: they are separate files."""
    directory = Path(directory) if directory else report_dir(report)
    cache_dir = Path(report.cache_dir)
    scores = None
    if report.stats:  # the shards were verified and read once already; read them for the plots
        scores = load_scores(cache_dir, read_json(cache_dir / MANIFEST))
    sources = report_sources(report, scores)
    # The cache and its storage may be read-only on purpose: the report can go anywhere.
    ensure_dir(directory, fix="write the report to a writable folder with `dpo audit ... --report-dir DIR`")
    with exclusive(directory / ".lock", f"audit report {directory}", wait=True):
        # a killed writer's temporary report files (only those: the folder may be the user's)
        remove_leftovers(directory, of=tuple(f"{level}{suffix}" for level in layout.AUDIT_LEVELS
                                             for suffix in (".json", ".html")))
        atomic_write_json(directory / f"{report.level}.json", report.to_dict())
        return write_html(report, scores, directory / f"{report.level}.html", sources)


def current_full_audit(cache_dir: str | Path, rescore_rows: int = 0) -> dict | None:
    """The saved full audit of this cache if it passed and is valid for the bytes on disk now:
    the shards it read are those the (verified) manifest lists, and it re-scored enough rows."""
    cache_dir = Path(cache_dir)
    try:
        manifest = layout.verified_refscores(cache_dir)
    except CacheError:
        return None
    saved = read_json(layout.audit_report_path(layout.storage_of(cache_dir), manifest["fingerprint"], "full"))
    if not saved or saved.get("passed") is not True:
        return None
    if saved.get("shards") != {s["file"]: s["sha256"] for s in manifest["shards"]}:
        return None
    if rescore_rows and (saved.get("rescore") or {}).get("rows", 0) < rescore_rows:
        return None
    return saved
