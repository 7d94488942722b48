"""The configuration's error and the range and folder-name checks its sections share (no pipeline import, no torch).

``ConfigError`` is raised for every problem of a configuration; ``pipeline.config.schema`` re-exports it,
the name importers use.
"""

from __future__ import annotations

import re

from pipeline.errors import ConfigError


def check_range(key, value, lo, hi, hi_open=False):
    """A ConfigError naming ``key`` unless lo <= value <= hi (value < hi with hi_open; None: no bound)."""
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value!r} is below the minimum {lo}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        bound = f"below {hi}" if hi_open else f"at most {hi}"
        raise ConfigError(f"{key}: {value!r} must be {bound}")


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A folder name that is safe everywhere: no separators, NUL, spaces, leading dot or dash."""

FOLDER_NAME_KEYS = ("train.run_name", "data.split", "data.name", "data.data_dir", "sweep.name")
"""The config values that become folder names under storage (paths.run_dir, data.hub_dataset, sweeps/),
each checked against RUN_NAME (data.data_dir per '/'-separated part)."""


def check_folder_name(key: str, value: str, example: str, alternative: str = "", whole: str | None = None) -> None:
    """A ConfigError naming ``key`` unless ``value`` is a safe folder name (RUN_NAME)."""
    if RUN_NAME.fullmatch(value):
        return
    whole = value if whole is None else whole
    shown = whole if len(whole) <= 60 else whole[:60] + "..."
    part = "" if whole == value else f", its part {value!r} between '/'s"
    raise ConfigError(
        f"{key}: {shown!r} ({len(whole)} characters{part}) is not a safe folder name", hint="use 1-100 ASCII "
        f"letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. {key}={example})"
        f"{alternative}"
    )
