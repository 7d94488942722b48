"""The scorers' shared types: the Scorer protocol and the progress callback."""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

Progress = Callable[[int, int, int], None]
"""progress(sequences, response tokens, sequence tokens) after each batch."""


class Scorer(Protocol):
    name: str
    """The backend: "transformers" or "vllm"."""
    device: str
    settings: dict
    """Resolved settings that can change low-order bits (recorded in the cache's manifest)."""

    def score_pairs(
        self,
        prompts: list[list[int]],
        chosens: list[list[int]],
        rejecteds: list[list[int]],
        progress: Progress | None = None,
        rows: list[int] | None = None,
    ) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
        """(chosen, rejected) per-token log-probs of each example, in input order.

        rows: only compute what these examples need (None elsewhere in the output), with the
        values a full call gives.
        """
        ...
