"""Audit a reference cache: integrity, staleness, statistics, row checks, re-score drift.

    report = audit(cache_dir, cfg=cfg, rescore_rows=8)   # or: dpo audit -c run.yaml --rescore 8
    report.passed, report.findings, report.stats

- integrity: the manifest against the files (every shard there, sha256 and row counts equal,
  completion flag set, no foreign or temporary files), ids unique and equal to the dataset's;
- staleness (with a config): fingerprints of what the config points to now (data file,
  tokenizer, settings, model config and weights, dtype) against what the cache was made from;
- statistics (polars): per-token and per-sequence log-probs, the reference margin, lengths,
  non-finite values (must be none), outliers with ids, the share of pairs the reference prefers;
- rows: every row's model-free consistency (refvalues) and token counts against the dataset's;
- re-score: k seeded rows scored again with the transformers backend, in the very batches the
  scorer used (so the same backend, dtype and device give a difference of exactly 0), or in
  another dtype; per-token and per-sequence max/mean |diff| against the cache.

The checks only: pipeline/audit/report.py shows what they found (the JSON and HTML report, saved
and read back, plots, token-by-token views) and imports this module, never the reverse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.config.schema import Config
from pipeline.data import resolve_input
from pipeline.errors import CacheError, DataError, ModelError
from pipeline.storage import locate, paths, refvalues, trust
from pipeline.storage.shards import ShardPlan
from pipeline.store import MANIFEST, read_json, sha256_verified


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
    created: str = field(default_factory=lambda: utc_text(datetime.now(timezone.utc).timestamp()))
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


def utc_text(timestamp: float) -> str:
    """A time as the report shows it: 2024-05-01 12:00:00 UTC."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def dataset_dir_of(cache_dir: Path, manifest: dict) -> Path:
    return paths.dataset_dir(paths.storage_of(cache_dir), manifest["inputs"]["dataset_fingerprint"])


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
        listed = {s["file"]: s for s in trust.refscores_shards(manifest)}
        ShardPlan.of(manifest)  # the row checks and the re-score find rows in shards by it
    except CacheError as exc:
        report.fail("integrity", str(exc))
        return None
    intact = all([_check_shard(report, cache_dir / name, entry) for name, entry in listed.items()])
    for path in sorted(cache_dir.iterdir()):
        if path.name.startswith(".tmp-"):
            report.fail("integrity", f"temporary file {path.name} left by an interrupted write")
        elif path.name not in listed and path.name != MANIFEST:
            kind = "unlisted shard" if ShardPlan.index_of(path.name) is not None else "foreign file"
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
    trust.verified_dataset(dataset_dir)
    dataset_ids = pl.read_parquet(dataset_dir / paths.EXAMPLES, columns=["id"])["id"]
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
    from pipeline.data import input_sha256
    from pipeline.models.loading import model_fingerprint, tokenizer_files

    dataset_manifest = read_json(dataset_dir_of(Path(report.cache_dir), manifest) / MANIFEST) or {}
    then = dataset_manifest.get("inputs") or {}
    if then:
        if locate.source_exists(cfg) and input_sha256(resolve_input(cfg.data, cfg.storage)) != then["data_sha256"]:
            report.fail("staleness", f"the data file changed since it was prepared ({cfg.data.path})")
        now_files, then_files = tokenizer_files(cfg.model), then["tokenizer_files"]
        for name in sorted(set(now_files) | set(then_files)):
            if now_files.get(name) != then_files.get(name):
                report.fail("staleness", f"tokenizer file {name} changed since the data was prepared")
        for group, current in (("data", paths.data_settings(cfg)), ("tokenize", paths.tokenize_settings(cfg))):
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
    dataset = pl.read_parquet(dataset_dir_of(cache_dir, manifest) / paths.EXAMPLES,
                              columns=["id", "chosen_tokens", "rejected_tokens"])
    ids = scores["id"]
    for side in refvalues.SIDES:
        differs = (scores[f"{side}_tokens"].cast(pl.Int64) != dataset[f"{side}_tokens"].cast(pl.Int64)).arg_true()
        problems += [refvalues.RowProblem(i, ids[i], side, f"{scores[f'{side}_tokens'][i]} tokens, the dataset has "
                                          f"{dataset[f'{side}_tokens'][i]}") for i in differs.to_list()]
    problems.sort(key=lambda p: (p.row, p.side))
    shards = ShardPlan.of(manifest)
    listed = [{"row": problem.row, "id": problem.id, "shard": ShardPlan.file(shards.shard_of(problem.row)),
               "side": problem.side, "problem": problem.problem} for problem in problems[:ROWS_LISTED]]
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


@dataclass
class Rescore:
    """What a full audit re-scores: ``rows`` examples drawn with ``seed``, in ``dtype`` (None: the
    cache's), held to ``tolerance`` (None: trust.logprob_tolerance of the dtypes and backend),
    plus the rows that failed the row checks (``failed``), always."""

    rows: int
    seed: int = 0
    dtype: str | None = None
    tolerance: float | None = None
    failed: list[int] = field(default_factory=list)


def rescore_check(report: AuditReport, cfg: Config, cache_dir: Path, manifest: dict, scores: pl.DataFrame,
                  plan: Rescore) -> None:
    """Re-score ``plan.rows`` seeded examples with transformers, in the cache's own batches (so the
    same backend, dtype and settings reproduce identical bits); compare with the cache. The rows
    that failed the row checks (``plan.failed``) are always re-scored too."""
    import dataclasses

    from pipeline.logprobs.backends import make_scorer

    inputs, rows, failed, tolerance = manifest["inputs"], plan.rows, plan.failed, plan.tolerance
    model_cfg = dataclasses.replace(cfg.model, dtype=plan.dtype or inputs["dtype"])
    examples = pl.read_parquet(dataset_dir_of(cache_dir, manifest) / paths.EXAMPLES,
                               columns=["id", "prompt_ids", "chosen_ids", "rejected_ids"])
    scorer = make_scorer("transformers", dataclasses.replace(cfg, model=model_cfg), 0, manifest.get("settings"))
    rng = np.random.default_rng(plan.seed)
    sample = rng.choice(examples.height, size=min(rows, examples.height), replace=False).tolist()
    picked = sorted(set(sample) | set(failed))
    shards = ShardPlan(examples.height, inputs["shard_rows"])
    token_diffs, seq_diffs, seq_per_token = [], [], []
    for index in sorted({shards.shard_of(i) for i in picked}):
        span = shards.rows_of(index)
        part = examples.slice(span.start, len(span))
        local = [i - span.start for i in picked if i in span]
        token_ids = [part[f"{name}_ids"].to_list() for name in ("prompt", "chosen", "rejected")]
        chosen, rejected = scorer.score_pairs(*token_ids, rows=local)
        for i in local:
            cached = scores.row(span.start + i, named=True)
            for side, values in (("chosen", chosen[i]), ("rejected", rejected[i])):
                seq_diffs.append(abs(float(np.sum(values, dtype=np.float64)) - cached[f"{side}_logp"]))
                seq_per_token.append(seq_diffs[-1] / max(len(values), 1))
                if cached.get(f"{side}_token_logps") is not None:
                    kept = np.asarray(cached[f"{side}_token_logps"], np.float32)
                    token_diffs.append(np.abs(values - kept) if kept.shape == values.shape else np.array([np.inf]))
    del scorer
    tokens = np.concatenate(token_diffs) if token_diffs else np.zeros(0)
    limit = tolerance if tolerance is not None else trust.logprob_tolerance(
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
        rescore_check(report, cfg, cache_dir, manifest, scores, Rescore(rescore_rows, seed, dtype, tolerance, failed))
    return report


def diff_caches(a: str | Path, b: str | Path) -> dict:
    """Row-by-row comparison of two caches of the same dataset (e.g. vllm vs transformers)."""
    a, b = Path(a), Path(b)
    ma, mb = trust.verified_refscores(a), trust.verified_refscores(b)
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
