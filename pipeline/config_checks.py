"""The configuration's error and the range check its sections share (no pipeline import, no torch).

``ConfigError`` is raised for every problem of a configuration; ``pipeline.config`` re-exports it,
the name importers use.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the key and says what to fix."""


def check_range(key, value, lo, hi, hi_open=False):
    """A ConfigError naming ``key`` unless lo <= value <= hi (value < hi with hi_open; None: no bound)."""
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value!r} is below the minimum {lo}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        bound = f"below {hi}" if hi_open else f"at most {hi}"
        raise ConfigError(f"{key}: {value!r} must be {bound}")
