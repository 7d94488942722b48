"""pipeline/errors.py: every error a user can fix is a DpoError, defined there and nowhere else;
the command line turns any of them into one `error: ...` line and its exit status."""

from __future__ import annotations

import ast
import pickle
from argparse import Namespace
from pathlib import Path

import pytest

from pipeline import errors
from pipeline.errors import AuditFailed, CacheError, ConfigError, DpoError

from flows.cli import commands

ROOT = Path(__file__).resolve().parents[1]
NOT_USER_ERRORS = {"pipeline/prepare/records.py": {"Reject"}}
"""Exceptions that never reach a user: a rejected row is counted in the rejects file."""


def _exception_classes(path: Path) -> set[str]:
    """Classes of ``path`` whose bases name an exception (…Error, …Exception, Exception itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if any(b.endswith(("Error", "Exception", "Failed", "Busy", "Refused")) or b == "NoServer" for b in bases):
                found.add(node.name)
    return found


def test_every_exception_class_is_defined_in_the_errors_module():
    elsewhere = {}
    for folder in ("pipeline", "flows"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name == "pipeline/errors.py":
                continue
            extra = _exception_classes(path) - NOT_USER_ERRORS.get(name, set())
            if extra:
                elsewhere[name] = sorted(extra)
    assert not elsewhere, f"define user-facing errors in pipeline/errors.py: {elsewhere}"


def test_the_errors_module_holds_only_dpo_errors():
    classes = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, BaseException)]
    assert len(classes) >= 17
    assert all(issubclass(cls, DpoError) for cls in classes)
    assert ConfigError.exit_code == 2 and {cls.exit_code for cls in classes if cls is not ConfigError} == {1}


def test_the_hint_is_carried_shown_and_pickled():
    exc = CacheError("refscores/abc has no manifest.json", hint="run `dpo score`")
    assert str(exc) == "refscores/abc has no manifest.json: run `dpo score`"
    assert (exc.message, exc.hint) == ("refscores/abc has no manifest.json", "run `dpo score`")
    assert str(CacheError("damaged")) == "damaged" and CacheError("damaged").hint == ""
    back = pickle.loads(pickle.dumps(exc))  # from a worker process
    assert type(back) is CacheError and (back.message, back.hint) == (exc.message, exc.hint)
    assert isinstance(exc, RuntimeError) and isinstance(ConfigError("x"), ValueError)


@pytest.mark.parametrize("error, code", [(AuditFailed("2 checks failed", hint="see the report"), 1),
                                         (ConfigError("train.beta must be > 0"), 2)])
def test_the_command_line_catches_the_base_class(error, code, monkeypatch, capsys):
    """No list of error types to keep up to date: any DpoError is one line and its exit status."""

    def failing(args):
        raise error

    monkeypatch.setitem(commands.COMMANDS, "status", failing)
    assert commands.run(Namespace(command="status")) == code
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {error}"]


def test_anything_else_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setitem(commands.COMMANDS, "status", broken)
    with pytest.raises(KeyError):
        commands.run(Namespace(command="status"))
