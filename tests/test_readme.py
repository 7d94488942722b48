"""README.md is the front door: what it is, the Quick start, your model and data, the headline
results, a paragraph each on scheduling, auditing and scaling, install and development, in that
order and under 250 lines; everything else is in docs/ (tests/test_docs.py)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

SECTIONS = [
    "Quick start",
    "Train on your model and data",
    "Measured results",
    "Scheduling and orchestration (Prefect)",
    "Iterative DPO (rounds)",
    "Auditing a reference cache",
    "Scaling",
    "Install",
    "Development",
]
"""README's `##` sections, in order (issue 21)."""


def test_readme_is_under_250_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < 250, f"README.md has {lines} lines: move reference material to docs/"


def test_readme_sections_in_order():
    headings = re.findall(r"(?m)^## (.+)$", README.read_text(encoding="utf-8"))
    assert headings == SECTIONS


def test_readme_puts_your_model_and_data_first():
    """What it is, Quick start (exactly `make demo` and `make test`), then "Train on your model
    and data" with commands on a config that exists, before the reference sections."""
    text = README.read_text(encoding="utf-8")
    headings = re.findall(r"(?m)^## (.+)$", text)
    assert headings[:2] == ["Quick start", "Train on your model and data"]
    assert headings.index("Train on your model and data") < headings.index("Install")
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make demo", "make test"]
    yours = text.split("## Train on your model and data", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"(?m)^dpo (prepare|score|train) +-c (\S+)", yours)
    assert [c for c, _ in commands] == ["prepare", "score", "train"]
    for _, path in commands:
        assert (README.parent / path).is_file(), path


def test_readme_sections_after_the_results_link_to_docs():
    """Scheduling, auditing and scaling are a paragraph each with a link to their docs/ page."""
    text = README.read_text(encoding="utf-8")
    for heading, page in [("Scheduling and orchestration (Prefect)", "docs/orchestration.md"),
                          ("Auditing a reference cache", "docs/audit.md"), ("Scaling", "docs/scaling.md"),
                          ("Measured results", "docs/benchmarks.md")]:
        section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
        assert f"]({page})" in section, (heading, page)
        assert section.count("\n```") == 0 or heading == "Measured results", f"{heading}: a paragraph, no code block"
