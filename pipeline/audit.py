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

import base64
import html
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from .config import Config
from .score import REPORT_FILES, SHARD_RE, logprob_tolerance
from .store import atomic_write_json, atomic_write_text, read_manifest, sha256_file


@dataclass
class Finding:
    check: str  # integrity | staleness | numerics | rescore
    ok: bool
    message: str


@dataclass
class AuditReport:
    cache_dir: str
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
        return {"cache_dir": self.cache_dir, "passed": self.passed,
                "findings": [asdict(f) for f in self.findings], "stats": self.stats,
                "rescore": self.rescore}  # fmt: skip


def dataset_dir_of(cache_dir: Path, manifest: dict) -> Path:
    return Path(cache_dir).parent.parent / "datasets" / manifest["inputs"]["dataset_fingerprint"]


# --- integrity ------------------------------------------------------------------------------------


def check_integrity(report: AuditReport, cache_dir: Path, manifest: dict | None) -> bool:
    """Manifest vs files, and ids vs the dataset. Returns whether the shards can be read."""
    if manifest is None or manifest.get("kind") != "refscores":
        report.fail("integrity", f"{cache_dir} has no readable refscores manifest.json")
        return False
    if not manifest.get("complete"):
        report.fail("integrity", "the manifest's completion flag is not set: scoring did not finish")
    listed = {s["file"]: s for s in manifest.get("shards", [])}
    readable = True
    for name, entry in listed.items():
        path = cache_dir / name
        if not path.is_file():
            report.fail("integrity", f"shard {name} is missing")
            readable = False
            continue
        if sha256_file(path, use_cache=False) != entry["sha256"]:
            report.fail("integrity", f"shard {name}: sha256 differs from the manifest (the file changed)")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:
            report.fail("integrity", f"shard {name} is not readable Parquet ({exc})")
            readable = False
            continue
        if rows != entry["rows"]:
            report.fail("integrity", f"shard {name}: {rows} rows, the manifest says {entry['rows']}")
    for path in sorted(cache_dir.iterdir()):
        name = path.name
        if name.startswith(".tmp-"):
            report.fail("integrity", f"temporary file {name} left by an interrupted write")
        elif name not in listed and name != "manifest.json" and name not in REPORT_FILES:
            kind = "unlisted shard" if SHARD_RE.match(name) else "foreign file"
            report.fail("integrity", f"{kind} {name} in the cache directory")
    if sum(s["rows"] for s in listed.values()) != manifest.get("rows"):
        report.fail("integrity", "the shards' row counts do not add up to the manifest's rows")
    if not readable:
        return False
    ids = pl.concat([pl.read_parquet(cache_dir / name, columns=["id"]) for name in listed])["id"]
    if ids.n_unique() != len(ids):
        report.fail("integrity", f"{len(ids) - ids.n_unique()} ids appear more than once")
    dataset_dir = dataset_dir_of(cache_dir, manifest)
    if not (dataset_dir / "examples.parquet").is_file():
        report.fail("integrity", f"the dataset it was scored on is gone ({dataset_dir})")
    else:
        dataset_ids = pl.read_parquet(dataset_dir / "examples.parquet", columns=["id"])["id"]
        if not ids.equals(dataset_ids):
            missing = set(dataset_ids) - set(ids)
            report.fail("integrity", f"ids differ from the dataset's ({len(missing)} examples unscored)")
    if all(f.ok for f in report.findings if f.check == "integrity"):
        report.ok("integrity", f"{len(listed)} shards, {len(ids)} rows: files, checksums and ids match")
    return True


# --- staleness ------------------------------------------------------------------------------------


def check_staleness(report: AuditReport, cfg: Config, manifest: dict) -> None:
    """What the config points to now vs what the cache (and its dataset) were made from."""
    from .data import input_sha256
    from .models import load_tokenizer, model_fingerprint, tokenizer_fingerprint

    before = len(report.findings)
    dataset_manifest = read_manifest(dataset_dir_of(Path(report.cache_dir), manifest)) or {}
    then = dataset_manifest.get("inputs", {})
    if then:
        if Path(cfg.data.path).exists() and input_sha256(cfg.data.path) != then["data_sha256"]:
            report.fail("staleness", f"the data file changed since it was prepared ({cfg.data.path})")
        now_tok = tokenizer_fingerprint(cfg.model, load_tokenizer(cfg.model))
        for name in sorted(set(now_tok["files"]) | set(then["tokenizer"]["files"])):
            if now_tok["files"].get(name) != then["tokenizer"]["files"].get(name):
                report.fail("staleness", f"tokenizer file {name} changed since the data was prepared")
        if now_tok["chat_template_sha256"] != then["tokenizer"]["chat_template_sha256"]:
            report.fail("staleness", "the chat template changed since the data was prepared")
        for group in ("data_settings", "tokenize_settings"):
            current = _settings(cfg, group)
            for key, value in then[group].items():
                if current.get(key) != value:
                    report.fail("staleness", f"setting {group.split('_')[0]}.{key} was {value!r}, is {current.get(key)!r}")
    now_model = model_fingerprint(cfg.model)
    then_model = manifest["inputs"]["model"]
    if now_model["config_sha256"] != then_model["config_sha256"]:
        report.fail("staleness", "the model config changed since scoring (config.json)")
    for name in sorted(set(now_model["weights"]) | set(then_model["weights"])):
        if now_model["weights"].get(name) != then_model["weights"].get(name):
            report.fail("staleness", f"model weights changed since scoring ({name})")
    if cfg.model.dtype != manifest["inputs"]["dtype"]:
        report.fail("staleness", f"the cache was scored in {manifest['inputs']['dtype']}, the config says {cfg.model.dtype}")
    if len(report.findings) == before:
        report.ok("staleness", "data, tokenizer, settings and model match what the cache was made from")


def _settings(cfg: Config, group: str) -> dict:
    if group == "data_settings":
        d = cfg.data
        return {"format": d.format, "eval_fraction": d.eval_fraction,
                "columns": [d.prompt_column, d.chosen_column, d.rejected_column],
                "implicit_prompt_marker": d.implicit_prompt_marker}  # fmt: skip
    t = cfg.tokenize
    return {"max_length": t.max_length, "max_prompt_length": t.max_prompt_length,
            "prompt_truncation": t.prompt_truncation, "add_eos": t.add_eos,
            "min_response_tokens": t.min_response_tokens}  # fmt: skip


# --- statistics -----------------------------------------------------------------------------------


def _describe(series: pl.Series) -> dict:
    finite = series.filter(series.is_finite())
    if len(finite) == 0:
        return {"count": 0}
    q = lambda p: float(finite.quantile(p, interpolation="linear"))  # noqa: E731
    return {"count": len(finite), "mean": float(finite.mean()), "std": float(finite.std() or 0.0),
            "min": float(finite.min()), "p01": q(0.01), "p50": q(0.5), "p99": q(0.99),
            "max": float(finite.max())}  # fmt: skip


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
    }  # fmt: skip
    nonfinite = int((~scores["chosen_logp"].is_finite()).sum() + (~scores["rejected_logp"].is_finite()).sum())
    by_margin = scores.with_columns(margin.alias("margin")).sort(pl.col("margin").abs(), descending=True)
    stats["largest_abs_margin"] = by_margin.select("id", "margin").head(top).to_dicts()
    if has_tokens:
        tokens = pl.concat([
            scores.select("id", pl.col(f"{side}_token_logps").alias("logp"), pl.lit(side).alias("side"))
            .with_columns(pl.int_ranges(pl.col("logp").list.len()).alias("position"))
            .explode("logp", "position")
            for side in ("chosen", "rejected")
        ])  # fmt: skip
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
                  rows: int, seed: int = 0, dtype: str | None = None, tolerance: float | None = None) -> None:  # fmt: skip
    """Re-score ``rows`` seeded examples with transformers; compare with the cache."""
    import dataclasses

    from .score import TransformersScorer

    settings = manifest.get("settings", {})
    model_cfg = dataclasses.replace(cfg.model, dtype=dtype or manifest["inputs"]["dtype"])
    # The cache's own batching, so that identical settings reproduce identical bits.
    score_cfg = dataclasses.replace(cfg.score, tokens_per_batch=settings.get("tokens_per_batch"),
                                    prefix_sharing=settings.get("prefix_sharing", True))  # fmt: skip
    rescoring = dataclasses.replace(cfg, model=model_cfg, score=score_cfg)
    scorer = TransformersScorer(rescoring)
    examples = pl.read_parquet(dataset_dir_of(cache_dir, manifest) / "examples.parquet",
                               columns=["id", "prompt_ids", "chosen_ids", "rejected_ids"])  # fmt: skip
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(examples.height, size=min(rows, examples.height), replace=False).tolist())
    shard_rows = manifest["inputs"]["shard_rows"]
    token_diffs, seq_diffs = [], []
    for shard_index in sorted({i // shard_rows for i in picked}):
        start = shard_index * shard_rows
        part = examples.slice(start, shard_rows)
        local = [i - start for i in picked if start <= i < start + shard_rows]
        chosen, rejected = scorer.score_pairs(part["prompt_ids"].to_list(), part["chosen_ids"].to_list(),
                                              part["rejected_ids"].to_list(), rows=local)  # fmt: skip
        for i in local:
            cached = scores.row(start + i, named=True)
            for side, values in (("chosen", chosen[i]), ("rejected", rejected[i])):
                seq_diffs.append(abs(float(np.sum(values, dtype=np.float64)) - cached[f"{side}_logp"]))
                if cached.get(f"{side}_token_logps") is not None:
                    token_diffs.append(np.abs(values - np.asarray(cached[f"{side}_token_logps"], np.float32)))
    del scorer
    tokens = np.concatenate(token_diffs) if token_diffs else np.zeros(0)
    limit = tolerance if tolerance is not None else logprob_tolerance(
        (model_cfg.dtype, manifest["inputs"]["dtype"]), manifest["inputs"]["backend"]
    )
    result = {"rows": len(picked), "ids": examples["id"].gather(picked).to_list(), "dtype": model_cfg.dtype,
              "token_max": float(tokens.max()) if tokens.size else None,
              "token_mean": float(tokens.mean()) if tokens.size else None,
              "seq_max": float(max(seq_diffs)), "seq_mean": float(np.mean(seq_diffs)), "tolerance": limit}  # fmt: skip
    report.rescore = result
    worst = result["token_max"] if result["token_max"] is not None else result["seq_max"]
    text = (f"re-scored {len(picked)} rows with transformers/{model_cfg.dtype}: per-token max |diff| "
            f"{result['token_max']}, per-sequence max |diff| {result['seq_max']:.3g} (tolerance {limit:g})")  # fmt: skip
    (report.ok if worst <= limit else report.fail)("rescore", text)


# --- the audit ------------------------------------------------------------------------------------


def audit(cache_dir: str | Path, cfg: Config | None = None, rescore_rows: int = 0, seed: int = 0,
          dtype: str | None = None, tolerance: float | None = None) -> AuditReport:  # fmt: skip
    cache_dir = Path(cache_dir)
    report = AuditReport(str(cache_dir))
    manifest = read_manifest(cache_dir)
    readable = check_integrity(report, cache_dir, manifest)
    if manifest is not None and cfg is not None:
        check_staleness(report, cfg, manifest)
    if readable:
        scores = load_scores(cache_dir, manifest)
        statistics(report, scores)
        if rescore_rows and cfg is not None:
            rescore_check(report, cfg, cache_dir, manifest, scores, rescore_rows, seed, dtype, tolerance)
    return report


def diff_caches(a: str | Path, b: str | Path) -> dict:
    """Row-by-row comparison of two caches of the same dataset (e.g. vllm vs transformers)."""
    a, b = Path(a), Path(b)
    ma, mb = read_manifest(a), read_manifest(b)
    if ma["inputs"]["dataset_fingerprint"] != mb["inputs"]["dataset_fingerprint"]:
        raise ValueError("the two caches were scored on different datasets: nothing to compare row by row")
    left, right = load_scores(a, ma), load_scores(b, mb)
    joined = left.join(right, on="id", suffix="_b")
    out = {"rows": joined.height, "a": {k: ma["inputs"][k] for k in ("backend", "dtype")},
           "b": {k: mb["inputs"][k] for k in ("backend", "dtype")}}  # fmt: skip
    for side in ("chosen", "rejected"):
        seq = (joined[f"{side}_logp"] - joined[f"{side}_logp_b"]).abs()
        out[f"{side}_seq_max"], out[f"{side}_seq_mean"] = float(seq.max()), float(seq.mean())
        if f"{side}_token_logps" in joined.columns and f"{side}_token_logps_b" in joined.columns:
            tok = joined.select((pl.col(f"{side}_token_logps").explode() - pl.col(f"{side}_token_logps_b").explode()).abs().alias("d"))["d"]
            out[f"{side}_token_max"], out[f"{side}_token_mean"] = float(tok.max()), float(tok.mean())
        out[f"{side}_token_counts_equal"] = bool((joined[f"{side}_tokens"] == joined[f"{side}_tokens_b"]).all())
    worst = joined.with_columns((pl.col("chosen_logp") - pl.col("chosen_logp_b")).abs().alias("d")).sort("d", descending=True)
    out["largest_chosen_diffs"] = worst.select("id", "d").head(5).to_dicts()
    return out


def example_tokens(cache_dir: str | Path, example_id: str, tokenizer) -> dict:
    """An example's response tokens, each with its cached reference log-prob."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    scores = load_scores(cache_dir, manifest).filter(pl.col("id") == example_id)
    if scores.height == 0:
        raise KeyError(f"no example with id {example_id} in {cache_dir}")
    example = pl.read_parquet(dataset_dir_of(cache_dir, manifest) / "examples.parquet").filter(pl.col("id") == example_id).row(0, named=True)
    row = scores.row(0, named=True)
    out = {"id": example_id, "prompt": example["prompt"]}
    for side in ("chosen", "rejected"):
        ids = example[f"{side}_ids"]
        logps = row.get(f"{side}_token_logps") or [None] * len(ids)
        out[side] = {"logp": row[f"{side}_logp"],
                     "tokens": [{"token": tokenizer.decode([t], clean_up_tokenization_spaces=False), "id": t, "logp": lp}
                                for t, lp in zip(ids, logps)]}  # fmt: skip
    return out


# --- report ---------------------------------------------------------------------------------------


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


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
    images["Log-prob histogram"] = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist((scores["chosen_logp"] - scores["rejected_logp"]).to_numpy(), bins=60, color="tab:green")
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("reference margin: log pi_ref(chosen) - log pi_ref(rejected)")
    ax.set_ylabel("pairs")
    images["Margin histogram"] = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for side in ("chosen", "rejected"):
        ax.scatter(scores[f"{side}_tokens"].to_numpy(), scores[f"{side}_logp"].to_numpy(), s=6, alpha=0.5, label=side)
    ax.set_xlabel("response tokens")
    ax.set_ylabel("sequence log-prob (nats)")
    ax.legend()
    images["Length vs log-prob"] = _png(fig)
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
                     f"{'ok' if f.ok else 'FAIL'}</td><td>{esc(f.message)}</td></tr>")  # fmt: skip
    parts.append("</table>")
    st = report.stats
    if st:
        parts.append("<h2>Statistics</h2><table>")
        scalars = {"rows": st["rows"], "NaN/inf values": st["nonfinite_values"],
                   "pairs the reference already prefers": f"{st['reference_prefers_chosen']:.1%}",
                   "max |sum of per-token - sequence| (nats)": st.get("max_token_sum_vs_sequence_diff")}  # fmt: skip
        for key, value in scalars.items():
            parts.append(f"<tr><th>{esc(key)}</th><td>{esc(str(value))}</td></tr>")
        columns = ("count", "mean", "std", "min", "p01", "p50", "p99", "max")
        parts.append("</table><h3>Distributions</h3><table><tr><th>quantity</th>"
                     + "".join(f"<th>{c}</th>" for c in columns) + "</tr>")  # fmt: skip
        rows = [("per-token log-prob", st.get("token_logp")),
                ("chosen log-prob", st["sequence_logp"]["chosen"]), ("rejected log-prob", st["sequence_logp"]["rejected"]),
                ("margin (chosen - rejected)", st["margin"]),
                ("chosen tokens", st["lengths"]["chosen"]), ("rejected tokens", st["lengths"]["rejected"])]  # fmt: skip
        for name, d in rows:
            if d:
                cells = "".join(f"<td>{d[c]:.4g}</td>" if c in d else "<td></td>" for c in columns)
                parts.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
        parts.append("</table>")
        for title, key, fields in (("Lowest per-token log-probs", "lowest_token_logps", ("id", "side", "position", "logp")),
                                   ("Largest |margin|", "largest_abs_margin", ("id", "margin"))):  # fmt: skip
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


def save_report(report: AuditReport) -> Path:
    """audit.json and audit.html in the cache directory; returns the HTML file."""
    cache_dir = Path(report.cache_dir)
    manifest = read_manifest(cache_dir)
    scores = load_scores(cache_dir, manifest) if report.stats else None
    atomic_write_json(cache_dir / "audit.json", report.to_dict())
    return write_html(report, scores, cache_dir / "audit.html")


def read_saved_report(cache_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(cache_dir) / "audit.json").read_text())
    except (OSError, ValueError):
        return None
