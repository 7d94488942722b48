"""README's configuration example is a valid configuration: docs cannot drift from the code."""

import re
from pathlib import Path

import yaml

from pipeline.config import config_from_dict

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_yaml_example_loads():
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no yaml example"
    for block in blocks:
        cfg = config_from_dict(yaml.safe_load(block))
        assert cfg.data.path and cfg.model.path


def test_readme_documents_every_config_key_and_reject_reason():
    import typing
    from dataclasses import fields, is_dataclass

    from pipeline.config import Config
    from pipeline.prepare import REJECT_REASONS

    text = README.read_text()
    for name, section in typing.get_type_hints(Config).items():
        if not is_dataclass(section):
            assert f"`{name}`" in text
            continue
        for key in fields(section):
            assert f"`{name}.{key.name}`" in text, f"{name}.{key.name} is not in README"
    for reason in REJECT_REASONS:
        assert f"`{reason}`" in text, reason


def test_readme_puts_your_model_and_data_first():
    """What it is, Quick start (exactly `make demo` and `make test`), then "Train on your model
    and data" with commands on a config that exists, before the reference sections."""
    text = README.read_text()
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
