"""The audit's report, for someone deciding whether to trust a cache; the checks themselves are
pipeline/audit/checks.py, the drill-down into one example pipeline/audit/tokens.py.

    path = save_report(audit(cache_dir, cfg))   # <storage>/audits/<cache fingerprint>/<level>.html

- ``save_report``: JSON and one self-contained HTML page (CSS and a line of JS inline, plots as
  PNG data): what the cache was made from (model and commit, tokenizer, data, backend, dtype,
  versions), prepare's counts (truncations, rejects by reason with examples), the checks, the
  statistics, outliers linked to a token-by-token view of each (coloured by log-prob), plots;
  ``current_full_audit`` reads a saved full report back, if it still holds for the cache on disk;
- drill-down (``example_tokens``, ``token_view``, ``logp_color``: pipeline/audit/tokens.py,
  which the page's outlier views use): one example's prompt and response tokens with their cached reference
  log-probs, for the page and for `dpo audit show`.

Part of the audit stage (tests/test_layering.py): it imports pipeline.audit.checks; only flows/ imports it.
"""

from __future__ import annotations

import html
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pipeline import __version__
from pipeline.audit.checks import AuditReport, dataset_dir_of, load_scores, token_frame, utc_text
from pipeline.audit.tokens import cache_tokenizer, dataset_examples, legend_html, token_view, tokens_html
from pipeline.errors import CacheError
from pipeline.reports.run_report import png_base64
from pipeline.storage import paths, trust
from pipeline.store import (
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    exclusive,
    read_json,
    remove_leftovers,
)

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
    rejects = pl.read_parquet(dataset_dir / paths.REJECTS, columns=["source_row", "reason", "detail", "raw"])
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
    sources.cache_written = utc_text((cache_dir / MANIFEST).stat().st_mtime)
    if not isinstance((manifest.get("inputs") or {}).get("dataset_fingerprint"), str):
        return sources
    dataset_dir = dataset_dir_of(cache_dir, manifest)
    if not trust.is_verified(trust.verified_dataset, dataset_dir):
        return sources
    sources.dataset = read_json(dataset_dir / MANIFEST) or {}
    sources.rejects = reject_examples(dataset_dir)
    ids = outlier_ids(report.stats)
    if scores is not None and ids:
        tokenizer, sources.decoded = cache_tokenizer(cache_dir, manifest)
        rows = {row["id"]: row for row in scores.filter(pl.col("id").is_in(ids)).to_dicts()}
        examples = {example["id"]: example for example in dataset_examples(dataset_dir, ids)}
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
    with plt.rc_context({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3}):
        for draw in (_logp_histogram, _margin_histogram, _by_position):
            fig, ax = plt.subplots(figsize=FIGSIZE)
            title = draw(ax, scores, tokens)
            fig.axes[0].set_title(title)
            images[title] = png_base64(fig)
            plt.close(fig)
    return images


def _logp_histogram(ax, scores: pl.DataFrame, tokens: pl.DataFrame | None) -> str:
    for side in ("chosen", "rejected"):
        values = (tokens.filter(pl.col("side") == side)["logp"] if tokens is not None
                  else scores[f"{side}_logp"].filter(scores[f"{side}_logp"].is_finite()))
        ax.hist(values.to_numpy(), bins=60, alpha=0.6, label=side)
    ax.set_xlabel(f"{'per-token' if tokens is not None else 'sequence'} reference log-prob (nats)")
    ax.set_ylabel("count")
    ax.legend()
    return "Log-prob histogram"


def _margin_histogram(ax, scores: pl.DataFrame, tokens: pl.DataFrame | None) -> str:
    margin = scores["chosen_logp"] - scores["rejected_logp"]
    ax.hist(margin.filter(margin.is_finite()).to_numpy(), bins=60, color="tab:green")
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("reference margin: log pi_ref(chosen) - log pi_ref(rejected) (nats)")
    ax.set_ylabel("pairs")
    return "Margin histogram"


def _by_position(ax, scores: pl.DataFrame, tokens: pl.DataFrame | None) -> str:
    if tokens is None:
        for side in ("chosen", "rejected"):
            per_token = scores[f"{side}_logp"] / scores[f"{side}_tokens"]
            ax.hist(per_token.filter(per_token.is_finite()).to_numpy(), bins=60, alpha=0.6, label=side)
        ax.set_xlabel("sequence log-prob / response tokens (nats per token)")
        ax.set_ylabel("responses")
        ax.legend()
        return "Log-prob per token (the cache holds no per-token values)"
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
    return "Per-token log-prob by position"


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


def _examples_html(stats: dict, sources: ReportSources) -> list[str]:
    esc = html.escape
    parts = ["<h2 id='examples'>Examples</h2>"]
    if not sources.examples:
        return parts + ["<p>No examples to show (the outliers' data cannot be read).</p>"]
    parts += [f"<p>The outliers, token by token: {esc(sources.decoded)}.</p>", legend_html()]
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
                         f"{truncated}</h4>" + tokens_html(shown["tokens"], framed.get((view["id"], side), set())))
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
    parts += _checks_html(report)
    parts += _prepare_html(sources)
    st = report.stats
    if st:
        parts += _statistics_html(st)
        parts += _outliers_html(st, {view["id"] for view in sources.examples})
    if scores is not None:
        parts.append("<h2 id='plots'>Plots</h2>")
        for title, data in plots(scores).items():
            parts.append(f"<img alt='{esc(title)}' title='{esc(title)}' src='data:image/png;base64,{data}'>")
    if st:
        parts += _examples_html(st, sources)
    parts.append(OPEN_EXAMPLE + "</body></html>")
    atomic_write_text(path, "\n".join(parts))
    return path


def _checks_html(report: AuditReport) -> list[str]:
    esc = html.escape
    parts = ["</table><h2 id='checks'>Checks</h2><table><tr><th>check</th><th>result</th><th>detail</th></tr>"]
    for f in report.findings:
        parts.append(f"<tr><td>{esc(f.check)}</td><td class='{'ok' if f.ok else 'fail'}'>"
                     f"{'ok' if f.ok else 'FAIL'}</td><td>{esc(f.message)}</td></tr>")
    parts.append("</table>")
    if report.rescore:
        parts.append(f"<h3>Re-score</h3><pre>{esc(json.dumps(report.rescore, indent=1))}</pre>")
    return parts


def _statistics_html(st: dict) -> list[str]:
    esc = html.escape
    parts = ["<h2 id='statistics'>Statistics</h2><table>"]
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
    return parts


def _outliers_html(st: dict, linked: set[str]) -> list[str]:
    """The outlier tables; ids in ``linked`` (the examples shown) link to their example."""
    esc = html.escape
    parts = ["</table><h2 id='outliers'>Outliers</h2><p>Each id opens its example, token by token.</p>"]
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
    return parts


def report_dir(report: AuditReport) -> Path:
    """<storage>/audits/<cache fingerprint>/: the report lives apart from the (read-only) cache."""
    name = report.cache_fingerprint or Path(report.cache_dir).name
    return paths.audit_dir(paths.storage_of(report.cache_dir), name)


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
        remove_leftovers(directory, of=tuple(f"{level}{suffix}" for level in paths.AUDIT_LEVELS
                                             for suffix in (".json", ".html")))
        atomic_write_json(directory / f"{report.level}.json", report.to_dict())
        return write_html(report, scores, directory / f"{report.level}.html", sources)


def current_full_audit(cache_dir: str | Path, rescore_rows: int = 0) -> dict | None:
    """The saved full audit of this cache if it passed and is valid for the bytes on disk now:
    the shards it read are those the (verified) manifest lists, and it re-scored enough rows."""
    cache_dir = Path(cache_dir)
    try:
        manifest = trust.verified_refscores(cache_dir)
    except CacheError:
        return None
    saved = read_json(paths.audit_report_path(paths.storage_of(cache_dir), manifest["fingerprint"], "full"))
    if not saved or saved.get("passed") is not True:
        return None
    if saved.get("shards") != {s["file"]: s["sha256"] for s in manifest["shards"]}:
        return None
    if rescore_rows and (saved.get("rescore") or {}).get("rows", 0) < rescore_rows:
        return None
    return saved
