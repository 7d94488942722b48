"""Progress of long work: a terminal bar when asked, and log lines at a sane cadence otherwise.

    with Progress(total, "score (vllm)", "rows", show_bar, log) as bar:
        bar.update(n); bar.set_postfix_str("3,100 tok/s")

With the bar hidden (``--no-progress``, a torchrun rank, a child process), the same progress
goes to the stage's logger every ``LOG_EVERY_S`` seconds and once at the end
("score (transformers): 1,200/5,000 rows (24%), 3,100 tok/s, 40 s"), which is what Prefect's run
logs show for hours-long stages. Under `dpo run` in a terminal both happen: the command sets
``DPO_PROGRESS_LOG=1`` (log lines even with a bar, for the flow run's logs) and, for the score
child whose output is captured line by line, ``DPO_PROGRESS_TTY=1`` (its bar goes to the
terminal, /dev/tty, not into the captured stream).
"""

from __future__ import annotations

import logging
import os
import sys
import time

LOG_EVERY_S = 30.0


class Progress:
    def __init__(self, total: float | None, desc: str, unit: str, show_bar: bool, logger: logging.Logger,
                 **bar_options):
        """``bar_options`` go to tqdm; ``initial`` (default 0) is the count already done (a resumed run)."""
        from tqdm.auto import tqdm

        initial = bar_options.pop("initial", 0)
        self.tty = _terminal() if show_bar and os.environ.get("DPO_PROGRESS_TTY") == "1" else None
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.tty or sys.stderr,
                        disable=not show_bar, dynamic_ncols=True, **bar_options)
        self.total, self.desc, self.unit, self.logger = total, desc, unit, logger
        self.n = self.initial = initial
        # a bar on the terminal says it already, unless the lines are wanted too (a flow run's logs)
        self.logging = not show_bar or os.environ.get("DPO_PROGRESS_LOG") == "1"
        self.started = self.last_log = time.perf_counter()
        self.postfix = ""

    def update(self, n: float = 1) -> None:
        self.bar.update(n)
        self.n += n
        if self.logging and time.perf_counter() - self.last_log >= LOG_EVERY_S:
            self.log()

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.bar.set_postfix_str(text, refresh=refresh)
        self.postfix = text

    def log(self) -> None:
        self.last_log = time.perf_counter()
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        total = f"/{self.total:,.0f}" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        self.logger.info("%s: %s%s %s%s%s, %.0f s", self.desc, f"{self.n:,.0f}", total, self.unit, share, extra,
                         self.last_log - self.started)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.logging and self.n > self.initial and exc[0] is None:
            self.log()
        self.bar.close()
        if self.tty is not None:
            self.tty.close()


def _terminal():
    """The controlling terminal for writing, or None (no terminal: the bar goes to stderr)."""
    try:
        return open("/dev/tty", "w")
    except OSError:
        return None
