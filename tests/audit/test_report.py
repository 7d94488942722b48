"""The audit report for someone deciding whether to trust a cache: header, prepare's counts,
outliers linked to a token-by-token view, plots; `dpo audit show` in colour; a real browser."""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.audit.checks import audit
from pipeline.audit.report import outlier_ids, save_report
from pipeline.audit.tokens import LOGP_SCALE, example_tokens, logp_color, shown_token
from pipeline.score.stage import score

from tests.conftest import assert_plots_render, chromium

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "bench" / "results" / "audit-report.png"


class _Page(HTMLParser):
    """The report's example views: {details id: {"open": bool, "spans": [(style, title, text)]}},
    plus the sections (h2 ids) in order and every link target."""

    def __init__(self, text: str):
        super().__init__()
        self.details: dict[str, dict] = {}
        self.sections: list[str] = []
        self.links: list[str] = []
        self._current = None
        self._span = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details":
            self._current = self.details.setdefault(attrs["id"], {"open": "open" in attrs, "spans": []})
        elif tag == "h2" and "id" in attrs:
            self.sections.append(attrs["id"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "span" and self._current is not None and "title" in attrs:
            self._span = [attrs["style"], attrs["title"], ""]

    def handle_data(self, data):
        if self._span is not None:
            self._span[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self._current["spans"].append(tuple(self._span))
            self._span = None
        elif tag == "details":
            self._current = None


def test_logp_colours_run_red_to_green_on_a_fixed_scale():
    low, high = LOGP_SCALE
    red, green = logp_color(low), logp_color(high)
    assert int(red[1:3], 16) > int(red[3:5], 16) and int(green[3:5], 16) > int(green[1:3], 16)
    assert logp_color(low - 50) == red and logp_color(high + 1) == green  # clipped to the scale
    assert logp_color(float("nan")) == logp_color(float("-inf")) != red
    assert logp_color(None) not in (red, green, logp_color(float("nan")))


def test_report_header_prepare_outliers_and_examples(scored):
    cfg, cache, _ = scored
    report = audit(cache, cfg)
    text = save_report(report).read_text()
    page = _Page(text)
    assert page.sections == ["header", "checks", "prepare", "statistics", "outliers", "plots", "examples"]
    manifest = json.loads((cache / "manifest.json").read_text())
    # Header: what the cache was made from and with, as recorded.
    for shown in (cfg.model.path, cfg.data.path, "transformers / float32 / cpu", "level full",
                  f"torch {manifest['versions']['torch']}", f"transformers {manifest['versions']['transformers']}",
                  manifest["inputs"]["model"]["weights"]["model.safetensors"][:12], "chat template applied",
                  "time of the manifest file", report.created):
        assert str(shown) in text, shown
    # Prepare: counts, truncations and rejects by reason with the rejected rows themselves.
    assert "<th>rows read</th><td>603</td>" in text and "<th>prompts truncated</th><td>0 (0.0%)</td>" in text
    for reason in ("malformed_json", "chosen_equals_rejected", "missing_field"):
        assert f"<td>{reason}</td><td>1</td>" in text
    assert "source row 30: no &#x27;rejected&#x27;" in text
    # Escaped everywhere: the chat template's tags are in prompts and tokens, never raw markup.
    assert "&lt;|im_start|&gt;" in text and "<|im_start|>" not in text and "<|im_end|>" not in text
    # Outliers: each listed id links to its example (capped at 10), which holds every response token
    # with its cached log-prob (value in the tooltip, colour on the fixed scale).
    ids = outlier_ids(report.stats)
    assert len(ids) == 10 and set(page.details) == {f"example-{i}" for i in ids}
    assert {f"#example-{i}" for i in ids} <= set(page.links)
    assert not any(view["open"] for view in page.details.values())  # opened by the address's #fragment
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    for example_id in ids[:3]:
        shown = example_tokens(cache, example_id, tokenizer)
        tokens = shown["chosen"]["tokens"] + shown["rejected"]["tokens"]
        spans = page.details[f"example-{example_id}"]["spans"]
        assert len(spans) == len(tokens)
        for (style, title, span_text), token in zip(spans, tokens):
            assert style == f"background:{logp_color(token['logp'])}"
            assert f"{token['logp']:.4f} nats" in title and span_text == shown_token(token)
    # Plots: three, and per-token log-prob by position instead of a sum that grows with length.
    assert text.count("data:image/png;base64,") == 3
    assert "Per-token log-prob by position" in text and "Length vs log-prob" not in text


def test_without_per_token_values_or_tokenizer_the_report_says_so(scored):
    cfg, cache, _ = scored
    cfg.score.store_token_logps = False
    lean = score(cfg, show_progress=False).output_dir
    lean_report = audit(lean)
    page = _Page(text := save_report(lean_report).read_text())
    assert "the cache holds no per-token values" in text and text.count("data:image/png;base64,") == 3
    ids = [row["id"] for row in lean_report.stats["largest_abs_margin"]]
    assert set(page.details) == {f"example-{i}" for i in ids}  # no per-token outliers: margins only
    assert all(style == f"background:{logp_color(None)}" for view in page.details.values()
               for style, _, _ in view["spans"])
    tokenizer_config = Path(cfg.model.path) / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["model_max_length"] = 123  # the tokenizer changed since the data was prepared
    tokenizer_config.write_text(json.dumps(settings))
    page = _Page(text := save_report(audit(cache)).read_text())
    assert "changed since the data was prepared: token ids are shown" in text
    spans = next(iter(page.details.values()))["spans"]
    assert spans and all(re.fullmatch(r"⟨\d+⟩", span_text) for _, _, span_text in spans)


def test_audit_show_prints_tokens_in_colour(scored, monkeypatch):
    from rich.console import Console

    from flows.cli import audit_command, commands
    from flows.cli.main import build_parser

    cfg, cache, _ = scored
    report = audit(cache)
    example_id = report.stats["lowest_token_logps"][0]["id"]
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, color_system="truecolor", width=200, record=True)
    monkeypatch.setattr(audit_command, "console", lambda: console)
    assert commands.run(build_parser().parse_args(["audit", "show", example_id, "--cache", str(cache)])) == 0
    raw, plain = output.getvalue(), console.export_text()
    assert "[bold]" not in raw and "[/" not in raw
    from transformers import AutoTokenizer

    shown = example_tokens(cache, example_id, AutoTokenizer.from_pretrained(cfg.model.path))
    assert f"{shown['id']} prompt" in plain and "log pi_ref = " in plain
    for side in ("chosen", "rejected"):
        assert "".join(t["token"] for t in shown[side]["tokens"]) in plain
        assert f"log pi_ref = {shown[side]['logp']:.3f}" in plain
    lowest = min(shown["chosen"]["tokens"], key=lambda t: t["logp"])
    rgb = ";".join(str(int(logp_color(lowest["logp"])[k:k + 2], 16)) for k in (1, 3, 5))
    assert f"48;2;{rgb}m{lowest['token']}" in raw  # the token itself, on its colour
    # A finding's text is printed as it is, never read as markup.
    report.fail("integrity", "shard [bold]x[/bold] is odd")
    audit_command.print_audit(report, cache)
    assert "shard [bold]x[/bold] is odd" in console.export_text()


@pytest.mark.slow  # a headless browser: CI runs it in make test-slow, once chromium is installed
def test_report_opens_an_example_in_chromium(scored, tmp_path):
    """The page loads, its scripts run (the address's #example-<id> opens that example), its
    images render; the screenshot is kept in bench/results/ (a CI artifact)."""
    _, cache, _ = scored
    report = audit(cache)
    page = save_report(report)
    example_id = outlier_ids(report.stats)[1]
    fragment = f"example-{example_id}"
    dom = chromium(tmp_path, "--dump-dom", f"{page.as_uri()}#{fragment}")
    opened = re.findall(r'<details id="(example-[0-9a-f]+)"( open="")?>', dom)
    assert len(opened) == 10 and [i for i, state in opened if state] == [fragment]
    assert dom.count('src="data:image/png;base64,') == 3
    assert_plots_render(page, tmp_path, fragment=fragment, height=7000, keep=ARTIFACT)
    assert ARTIFACT.stat().st_size > 10_000


def test_header_names_a_hub_model_by_commit_and_says_what_is_not_recorded():
    from pipeline.audit.checks import AuditReport
    from pipeline.audit.report import ReportSources, header_rows

    manifest = {"model_source": {"path": "org/model", "hub_id": "org/model", "revision": None, "commit": "c0ffee"},
                "inputs": {"backend": "vllm", "dtype": "bfloat16", "dataset_fingerprint": "ab" * 32}}
    rows = dict(header_rows(AuditReport("/x/refscores/y"), ReportSources(manifest=manifest)))
    assert rows["model"] == "org/model (revision main, commit c0ffee)"
    assert rows["backend / dtype / device"] == "vllm / bfloat16 / not recorded"
    assert rows["versions (score)"] == rows["cache written"] == rows["per-token log-probs"] == "not recorded"
    assert rows["dataset"] == "abababababab (its manifest cannot be read)"
