"""docs/ cannot drift from the code: the configuration reference is generated from
pipeline/config/schema.py (and must be regenerated when that changes), every key and reject reason is
documented, every YAML example is a valid configuration, and every relative link of README.md
and docs/**/*.md names an existing file and heading. (The command examples:
tests/test_readme_commands.py.)"""

from __future__ import annotations

import importlib.util
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.config.load import config_from_dict
from pipeline.config.schema import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CONFIG_MD = ROOT / "docs" / "reference" / "config.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "tools" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date():
    """docs/reference/config.md is what tools/gen_config_docs.py renders from pipeline/config/schema.py now."""
    rendered = _generator().render()
    committed = CONFIG_MD.read_text(encoding="utf-8") if CONFIG_MD.is_file() else ""
    assert committed == rendered, "docs/reference/config.md is stale: run make docs"


def _sections(cls, prefix=""):
    """(dotted prefix, dataclass) of every config section, Config itself first."""
    yield prefix, cls
    for name, tp in typing.get_type_hints(cls).items():
        inner = tp if is_dataclass(tp) else next((a for a in typing.get_args(tp) if is_dataclass(a)), None)
        if inner is not None:
            yield from _sections(inner, f"{prefix}{name}.")


def test_every_config_key_has_a_docstring_and_a_row():
    """The reference's meaning column is the docstring under each field: none may be missing."""
    from flows.params import attribute_docs

    text = CONFIG_MD.read_text(encoding="utf-8")
    undocumented = []
    for prefix, cls in _sections(Config):
        docs, hints = attribute_docs(cls), typing.get_type_hints(cls)
        for f in fields(cls):
            if is_dataclass(hints[f.name]):
                continue  # a section: a table of its own
            key = f"{prefix}{f.name}"
            assert f"| `{key}` |" in text, f"{key} has no row in docs/reference/config.md: run make docs"
            if not docs.get(f.name):
                undocumented.append(key)
    assert not undocumented, f"write a docstring under {', '.join(undocumented)} in pipeline/config/schema.py"


def test_every_reject_reason_is_documented():
    from pipeline.prepare.records import REJECT_REASONS

    text = (ROOT / "docs" / "reference" / "prepare.md").read_text(encoding="utf-8")
    for reason in REJECT_REASONS:
        assert f"`{reason}`" in text, f"{reason} is not in docs/reference/prepare.md"


def test_yaml_examples_load():
    """Every yaml block of README.md and docs/ is a configuration that loads."""
    found = 0
    for doc in DOCS:
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            cfg = config_from_dict(yaml.safe_load(block))
            assert cfg.data.path and cfg.model.path, doc
            found += 1
    assert found >= 2, "README's configuration example and the LoRA example"


# --- links ----------------------------------------------------------------------------------------


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: formatting dropped, lower case, punctuation but `-` and
    `_` removed, spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _blank(text: str, pattern: str, flags=0) -> str:
    """``text`` with what ``pattern`` matches blanked, newlines (and so line numbers) kept."""
    return re.sub(pattern, lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=flags)


def _prose(text: str) -> str:
    return _blank(text, r"(?m)^```[^\n]*\n.*?^```", re.S)


def anchors(path: Path) -> set[str]:
    """The heading anchors of a Markdown file, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"(?m)^#{1,6} +(.+?) *#*$", _prose(path.read_text(encoding="utf-8"))):
        slug = github_slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link outside code."""
    text = _blank(_prose(path.read_text(encoding="utf-8")), r"`[^`\n]+`")
    original = path.read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"!?\[[^\]\n]*\]\(([^()\s]+)\)", text):
        start, end = m.span(1)
        found.append((text.count("\n", 0, start) + 1, original[start:end]))
    return found


def test_the_link_checker_knows_githubs_anchors():
    assert github_slug("Many GPUs: torchrun, DDP and FSDP2") == "many-gpus-torchrun-ddp-and-fsdp2"
    assert github_slug("The development / CI lock") == "the-development--ci-lock"
    assert github_slug("Against TRL's DPOTrainer") == "against-trls-dpotrainer"
    assert github_slug("`train.peft`") == "trainpeft"
    assert github_slug("Scheduling and orchestration (Prefect)") == "scheduling-and-orchestration-prefect"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings(doc):
    broken = []
    for line, target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{doc.relative_to(ROOT)}:{line}: {target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{doc.relative_to(ROOT)}:{line}: {target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_readme_or_docs():
    """A page nobody links to is a page nobody reads."""
    linked = set()
    for doc in DOCS:
        for _, target in links(doc):
            path = target.partition("#")[0]
            if path and not re.match(r"[a-z][a-z0-9+.-]*:", path):
                linked.add((doc.parent / path).resolve())
    orphans = [str(d.relative_to(ROOT)) for d in DOCS[1:] if d.resolve() not in linked]
    assert not orphans, f"not linked from README.md or docs/: {orphans}"
