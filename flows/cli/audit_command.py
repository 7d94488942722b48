"""`dpo audit`: audit a reference cache and print its report (`dpo audit [CACHE] [-c CONFIG]`),
compare two caches (`dpo audit diff A B`), or show one example token by token (`dpo audit show
ID`). The checks are pipeline/audit/checks.py's, the HTML page pipeline/audit/report.py's; both are
imported when a command runs, so `dpo score` and `dpo train` never load them (polars)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config.load import load_config
from pipeline.errors import ConfigError
from pipeline.storage import locate, trust


def cache_from(args) -> Path:
    """The cache a config names: train.ref_cache, or the one `dpo score` makes for it (audited
    even when damaged), or a cache of the same dataset and model made with another backend."""
    if not args.config:
        raise ConfigError("give a cache directory or -c CONFIG")
    cfg = load_config(args.config, args.overrides)
    if cfg.train.ref_cache:
        return Path(cfg.train.ref_cache)
    dataset_fp = locate.dataset_dir_for(cfg).name
    directory = locate.refscores_dir_for(cfg, dataset_fp)
    return directory if directory.exists() else locate.find_refscores(cfg, dataset_fp)


def cmd_audit(args) -> Path | None:
    """dpo audit [PATH | -c CONFIG] | dpo audit diff A B | dpo audit show ID."""
    target = list(args.target)
    if target[:1] == ["diff"]:
        if len(target) != 3:
            raise ConfigError("usage: dpo audit diff CACHE_A CACHE_B")
        return audit_diff(args, Path(target[1]), Path(target[2]))
    if target[:1] == ["show"]:
        if len(target) != 2:
            raise ConfigError("usage: dpo audit show ID -c CONFIG (or --cache DIR)")
        return audit_show(args, target[1])
    if len(target) > 1:
        raise ConfigError("usage: dpo audit [CACHE_DIR] [-c CONFIG] [--rescore K]")
    return audit_report(args, Path(target[0]) if target else None)


def console():
    from rich.console import Console

    return Console(stderr=True)


def audit_diff(args, cache_a: Path, cache_b: Path) -> Path | None:
    from rich.table import Table

    from pipeline.audit.checks import diff_caches

    result = diff_caches(cache_a, cache_b)
    table = Table(title=f"{cache_a.name[:12]} vs {cache_b.name[:12]} ({result['rows']} rows)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if not isinstance(value, (list, dict)):
            table.add_row(key, f"{value:.3g}" if isinstance(value, float) else str(value))
    console().print(table)
    if args.json:
        print(json.dumps(result, default=str))
    return None if args.json else cache_a


def audit_show(args, example_id: str) -> Path | None:
    """One example token by token: each response token on a background coloured by its reference
    log-prob (on pipeline.audit.tokens.LOGP_SCALE), then the lowest tokens of each response."""
    from rich.text import Text

    from pipeline.audit.tokens import LOGP_LEGEND, cache_tokenizer, example_tokens, logp_color, shown_token

    cache = Path(args.cache) if args.cache else cache_from(args)
    tokenizer, decoded = cache_tokenizer(cache, trust.verified_refscores(cache))
    shown = example_tokens(cache, example_id, tokenizer)
    if args.json:
        print(json.dumps(shown))
        return None
    out = console()
    prompt = shown["prompt"] if len(shown["prompt"]) <= 500 else "…" + shown["prompt"][-500:]
    truncated = ", truncated" if shown["prompt_truncated"] else ""
    out.print(Text.assemble((shown["id"], "bold"), f" prompt ({shown['prompt_tokens']} tokens{truncated}):"))
    out.print(Text(prompt))
    legend = [(f" {v:g} ", f"black on {logp_color(v)}") for v in LOGP_LEGEND]
    out.print(Text.assemble("\ntoken log-prob (nats): ", *legend, f"  ({decoded})"))
    for side in ("chosen", "rejected"):
        tokens = shown[side]["tokens"]
        truncated = ", truncated" if shown[side]["truncated"] else ""
        out.print(Text.assemble("\n", (side, "bold"), f": log pi_ref = {shown[side]['logp']:.3f} over "
                                f"{len(tokens)} tokens{truncated}"))
        out.print(Text.assemble(*[(shown_token(t), f"black on {logp_color(t['logp'])}") for t in tokens]))
        if table := lowest_tokens(side, tokens):
            out.print(table)
    return cache


def lowest_tokens(side: str, tokens: list[dict], count: int = 5):
    """A table of a response's ``count`` lowest-log-prob tokens (position, token, id, log-prob on
    its colour), or None when no token has a log-prob."""
    from rich.table import Table
    from rich.text import Text

    from pipeline.audit.tokens import logp_color

    lowest = sorted((t["logp"], i) for i, t in enumerate(tokens) if t["logp"] is not None)[:count]
    if not lowest:
        return None
    table = Table(title=f"lowest {side} tokens", title_justify="left")
    for column in ("#", "token", "id", "log-prob"):
        table.add_column(column)
    for logp, i in lowest:
        token = tokens[i]
        table.add_row(str(i), Text(repr(token["token"]) if token["token"] is not None else ""),
                      str(token["id"]), Text(f"{logp:.3f}", style=f"black on {logp_color(logp)}"))
    return table


def audit_report(args, cache: Path | None) -> Path | None:
    from pipeline.audit.checks import audit
    from pipeline.audit.report import save_report
    from pipeline.errors import AuditFailed

    cfg = load_config(args.config, args.overrides) if args.config else None
    cache = cache or cache_from(args)
    if args.rescore and cfg is None:
        raise ConfigError("--rescore needs -c CONFIG (the model to re-score with)")
    report = audit(cache, cfg, rescore_rows=args.rescore, seed=args.seed, dtype=args.dtype, tolerance=args.tolerance)
    html_path = save_report(report, args.report_dir)
    print_audit(report, cache)
    console().print(f"report: {html_path}", markup=False, highlight=False)
    if args.json:  # stdout is then the JSON document alone
        print(json.dumps(report.to_dict(), default=str))
    if not report.passed:
        failed = [f.message for f in report.findings if not f.ok]
        raise AuditFailed(f"audit failed ({len(failed)} problems): " + "; ".join(failed))
    return None if args.json else cache


def print_audit(report, cache: Path) -> None:
    from rich.table import Table
    from rich.text import Text

    from pipeline.audit.report import outlier_ids

    out = console()
    table = Table(title=Text(f"audit of {cache}"))  # Text: paths and messages are not markup
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for finding in report.findings:
        table.add_row(finding.check, Text("ok", "green") if finding.ok else Text("FAIL", "red"), Text(finding.message))
    out.print(table)
    stats = report.stats
    if not stats:
        return
    summary = Table(title="statistics")
    summary.add_column("quantity")
    columns = ("mean", "p01", "p50", "p99", "min", "max")
    for column in columns:
        summary.add_column(column, justify="right")
    rows = [("chosen log-prob", stats["sequence_logp"]["chosen"]),
            ("rejected log-prob", stats["sequence_logp"]["rejected"]),
            ("margin", stats["margin"]), ("chosen tokens", stats["lengths"]["chosen"])]
    if "token_logp" in stats:
        rows.insert(0, ("per-token log-prob", stats["token_logp"]))
    for name, described in rows:
        summary.add_row(name, *(f"{described.get(k, float('nan')):.3f}" for k in columns))
    out.print(summary)
    out.print(f"reference already prefers the chosen response in {stats['reference_prefers_chosen']:.1%} of pairs")
    if ids := outlier_ids(stats, 5):
        out.print(Text(f"outliers (`dpo audit show ID --cache {cache}` shows one, token by token): "
                           + ", ".join(ids)))
