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
  another dtype; per-token and per-sequence max/mean |diff| against the cache.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from . import layout
from .config import Config
from .data import DataError, resolve_input
from .layout import MANIFEST, SHARD_RE, CacheError
from .models import ModelError
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
                "stats": self.stats, "rescore": self.rescore}


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
        tokens = pl.concat([
            scores.select("id", pl.col(f"{side}_token_logps").alias("logp"), pl.lit(side).alias("side"))
            .with_columns(pl.int_ranges(pl.col("logp").list.len()).alias("position"))
            .explode("logp", "position")
            for side in ("chosen", "rejected")
        ])
        nonfinite += int((~tokens["logp"].is_finite()).sum())
        stats["token_logp"] = _describe(tokens["logp"].cast(pl.Float64))
        stats["lowest_token_logps"] = tokens.sort("logp").head(top).to_dicts()
        sums_differ = scores.select(
            ((pl.col("chosen_token_logps").list.sum().cast(pl.Float64) - pl.col("chosen_logp")).abs().max()).alias("d")
        )["d"][0]
        stats["max_token_sum_vs_sequence_diff"] = float(sums_differ) if sums_differ is not None else None
    stats["nonfinite_values"] = nonfinite
    report.stats = stats
    if nonfinite:
        bad = scores.filter(~scores["chosen_logp"].is_finite() | ~scores["rejected_logp"].is_finite())["id"].to_list()
        report.fail("numerics", f"{nonfinite} NaN or infinite log-probs (e.g. ids {', '.join(bad[:3]) or 'in per-token values'})")
    else:
        report.ok("numerics", "no NaN or infinite log-probs")


# --- re-score -------------------------------------------------------------------------------------


def rescore_check(report: AuditReport, cfg: Config, cache_dir: Path, manifest: dict, scores: pl.DataFrame,
                  rows: int, seed: int = 0, dtype: str | None = None, tolerance: float | None = None) -> None:
    """Re-score ``rows`` seeded examples with transformers, in the cache's own batches (so the same
    backend, dtype and settings reproduce identical bits); compare with the cache."""
    import dataclasses

    from .scorers import make_scorer

    inputs = manifest["inputs"]
    model_cfg = dataclasses.replace(cfg.model, dtype=dtype or inputs["dtype"])
    examples = pl.read_parquet(dataset_dir_of(cache_dir, manifest) / layout.EXAMPLES,
                               columns=["id", "prompt_ids", "chosen_ids", "rejected_ids"])
    scorer = make_scorer("transformers", dataclasses.replace(cfg, model=model_cfg), 0, manifest.get("settings"))
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(examples.height, size=min(rows, examples.height), replace=False).tolist())
    shard_rows = inputs["shard_rows"]
    token_diffs, seq_diffs = [], []
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
                if cached.get(f"{side}_token_logps") is not None:
                    token_diffs.append(np.abs(values - np.asarray(cached[f"{side}_token_logps"], np.float32)))
    del scorer
    tokens = np.concatenate(token_diffs) if token_diffs else np.zeros(0)
    limit = tolerance if tolerance is not None else layout.logprob_tolerance(
        (model_cfg.dtype, inputs["dtype"]), inputs["backend"])
    result = {"rows": len(picked), "ids": examples["id"].gather(picked).to_list(), "dtype": model_cfg.dtype,
              "token_max": float(tokens.max()) if tokens.size else None,
              "token_mean": float(tokens.mean()) if tokens.size else None,
              "seq_max": float(max(seq_diffs)), "seq_mean": float(np.mean(seq_diffs)), "tolerance": limit}
    report.rescore = result
    worst = result["token_max"] if result["token_max"] is not None else result["seq_max"]
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
    except (OSError, pl.exceptions.PolarsError) as exc:
        report.fail("numerics", f"cannot read the scores: {exc}")
        return report
    if rescore_rows and cfg is not None:
        rescore_check(report, cfg, cache_dir, manifest, scores, rescore_rows, seed, dtype, tolerance)
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


def example_tokens(cache_dir: str | Path, example_id: str, tokenizer) -> dict:
    """An example's response tokens, each with its cached reference log-prob."""
    cache_dir = Path(cache_dir)
    manifest = layout.verified_refscores(cache_dir)
    scores = load_scores(cache_dir, manifest).filter(pl.col("id") == example_id)
    if scores.height == 0:
        raise KeyError(f"no example with id {example_id} in {cache_dir}")
    dataset_dir = dataset_dir_of(cache_dir, manifest)
    layout.verified_dataset(dataset_dir)
    examples = pl.read_parquet(dataset_dir / layout.EXAMPLES)
    example = examples.filter(pl.col("id") == example_id).row(0, named=True)
    row = scores.row(0, named=True)
    out = {"id": example_id, "prompt": example["prompt"]}
    for side in ("chosen", "rejected"):
        ids = example[f"{side}_ids"]
        logps = row.get(f"{side}_token_logps") or [None] * len(ids)
        tokens = [{"token": tokenizer.decode([t], clean_up_tokenization_spaces=False), "id": t, "logp": lp}
                  for t, lp in zip(ids, logps)]
        out[side] = {"logp": row[f"{side}_logp"], "tokens": tokens}
    return out


# --- report ---------------------------------------------------------------------------------------


def plots(scores: pl.DataFrame) -> dict[str, str]:
    """Base64 PNGs: log-prob histograms, margin histogram, length vs log-prob."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if "chosen_token_logps" in scores.columns:
        for side in ("chosen", "rejected"):
            values = scores[f"{side}_token_logps"].explode().drop_nulls().to_numpy()
            ax.hist(values[np.isfinite(values)], bins=60, alpha=0.6, label=side)
        ax.set_xlabel("per-token reference log-prob (nats)")
    else:
        for side in ("chosen", "rejected"):
            ax.hist(scores[f"{side}_logp"].to_numpy(), bins=60, alpha=0.6, label=side)
        ax.set_xlabel("sequence reference log-prob (nats)")
    ax.set_ylabel("count")
    ax.legend()
    images["Log-prob histogram"] = png_base64(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist((scores["chosen_logp"] - scores["rejected_logp"]).to_numpy(), bins=60, color="tab:green")
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("reference margin: log pi_ref(chosen) - log pi_ref(rejected)")
    ax.set_ylabel("pairs")
    images["Margin histogram"] = png_base64(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for side in ("chosen", "rejected"):
        ax.scatter(scores[f"{side}_tokens"].to_numpy(), scores[f"{side}_logp"].to_numpy(), s=6, alpha=0.5, label=side)
    ax.set_xlabel("response tokens")
    ax.set_ylabel("sequence log-prob (nats)")
    ax.legend()
    images["Length vs log-prob"] = png_base64(fig)
    plt.close(fig)
    return images


def write_html(report: AuditReport, scores: pl.DataFrame | None, path: Path) -> Path:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dpo-pipeline audit</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}td,th{padding:2px 8px;"
        "border-bottom:1px solid #ddd;text-align:left}.fail{color:#b00}.ok{color:#070}"
        "img{max-width:48%;margin:4px}</style></head><body>",
        f"<h1>Audit of {esc(Path(report.cache_dir).name[:16])}</h1>",
        f"<p>{esc(report.cache_dir)}: <b class='{'ok' if report.passed else 'fail'}'>"
        f"{'PASSED' if report.passed else 'FAILED'}</b></p>",
        "<h2>Checks</h2><table><tr><th>check</th><th>result</th><th>detail</th></tr>",
    ]
    for f in report.findings:
        parts.append(f"<tr><td>{esc(f.check)}</td><td class='{'ok' if f.ok else 'fail'}'>"
                     f"{'ok' if f.ok else 'FAIL'}</td><td>{esc(f.message)}</td></tr>")
    parts.append("</table>")
    st = report.stats
    if st:
        parts.append("<h2>Statistics</h2><table>")
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
        parts.append("</table>")
        for title, key, fields in (("Lowest per-token log-probs", "lowest_token_logps", ("id", "side", "position", "logp")),
                                   ("Largest |margin|", "largest_abs_margin", ("id", "margin"))):
            if st.get(key):
                parts.append(f"<h3>{title}</h3><table><tr>" + "".join(f"<th>{f}</th>" for f in fields) + "</tr>")
                for row in st[key]:
                    parts.append("<tr>" + "".join(f"<td>{esc(str(row[f]))}</td>" for f in fields) + "</tr>")
                parts.append("</table>")
    if report.rescore:
        parts.append(f"<h2>Re-score</h2><pre>{esc(json.dumps(report.rescore, indent=1))}</pre>")
    if scores is not None:
        parts.append("<h2>Plots</h2>")
        for title, data in plots(scores).items():
            parts.append(f"<img alt='{esc(title)}' title='{esc(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
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
    ensure_dir(directory)
    with exclusive(directory / ".lock", f"audit report {directory}", wait=True):
        # a killed writer's temporary report files (only those: the folder may be the user's)
        remove_leftovers(directory, of=tuple(f"{level}{suffix}" for level in layout.AUDIT_LEVELS
                                             for suffix in (".json", ".html")))
        atomic_write_json(directory / f"{report.level}.json", report.to_dict())
        return write_html(report, scores, directory / f"{report.level}.html")


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
