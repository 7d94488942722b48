"""Size limits that keep the code readable in an hour, checked on the source with `ast` (nothing
is imported), like tests/test_layering.py checks the layers:

- no module of pipeline/ or flows/ over 500 lines;
- no function there over 50 lines (from its `def` to its last line, docstring included), none in
  bench/ over 60 (a bench `main` is argument parsing plus calls);
- at most 6 parameters per function in pipeline/, flows/ and bench/ (self and cls not counted,
  *args and **kwargs counted): more travel together as a small dataclass;
- tests share helpers through tests/conftest.py or tests/helpers.py, never by importing another
  test file, and test the library through its public names: no `module._private` of pipeline/ or
  flows/ (read, called or monkeypatched).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("pipeline", "flows")
MODULE_LINES = 500
FUNCTION_LINES = {"pipeline": 50, "flows": 50, "bench": 60}
PARAMETERS = 6
SHARED_TEST_MODULES = {"tests.conftest", "tests.helpers", "conftest", "helpers"}


def _sources(folder: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / folder).rglob("*.py"))


def _functions(tree: ast.AST):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def long_modules(root: Path = ROOT, limit: int = MODULE_LINES) -> list[str]:
    return [f"{path.relative_to(root)}: {n} lines" for folder in LIBRARY for path in _sources(folder, root)
            if (n := len(path.read_text().splitlines())) > limit]


def long_functions(root: Path = ROOT, limits: dict[str, int] = FUNCTION_LINES) -> list[str]:
    found = []
    for folder, limit in limits.items():
        for path in _sources(folder, root):
            for node in _functions(ast.parse(path.read_text())):
                if (n := node.end_lineno - node.lineno + 1) > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {n} lines")
    return found


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    if named and named[0].arg in ("self", "cls"):
        named = named[1:]
    return len(named) + (args.vararg is not None) + (args.kwarg is not None)


def many_parameters(root: Path = ROOT, limit: int = PARAMETERS) -> list[str]:
    return [f"{path.relative_to(root)}:{node.lineno} {node.name}: {parameter_count(node)} parameters"
            for folder in (*LIBRARY, "bench") for path in _sources(folder, root)
            for node in _functions(ast.parse(path.read_text())) if parameter_count(node) > limit]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library_names(tree: ast.Module) -> set[str]:
    """Local names bound by importing pipeline/ or flows/ (modules, classes, functions)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARY:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in LIBRARY:
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def private_uses(source: str) -> list[str]:
    """`x._name` where x was imported from pipeline/ or flows/ (a module, a class), a private name
    imported from them, or monkeypatch.setattr(x, "_name") / setattr("pipeline.m._name")."""
    tree = ast.parse(source)
    library = _library_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in LIBRARY:
            found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names if _is_private(a.name)]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in library:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr":
            found += _private_setattr(node, library)
    return found


def _private_setattr(node: ast.Call, library: set[str]) -> list[str]:
    args = node.args
    if len(args) >= 2 and isinstance(args[0], ast.Name) and args[0].id in library \
            and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str) and _is_private(args[1].value):
        return [f"line {node.lineno}: setattr({args[0].id}, {args[1].value!r})"]
    if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str) \
            and args[0].value.split(".")[0] in LIBRARY and any(_is_private(p) for p in args[0].value.split(".")):
        return [f"line {node.lineno}: setattr({args[0].value!r})"]
    return []


def test_imports(source: str) -> list[str]:
    """Imports of another test module (tests.test_x, test_x), helpers and conftest aside."""
    found = []
    for node in ast.walk(ast.parse(source)):
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [f"line {node.lineno}: {m}" for m in modules
                  if m.split(".")[-1].startswith("test_") and m not in SHARED_TEST_MODULES]
    return found


test_imports.__test__ = False  # a checker, not a test


def test_no_module_over_500_lines():
    assert not long_modules(), "split these modules (one job each):\n" + "\n".join(long_modules())


def test_no_function_over_its_line_limit():
    assert not long_functions(), "split these functions:\n" + "\n".join(long_functions())


def test_no_function_has_more_than_6_parameters():
    assert not many_parameters(), "pass a small dataclass instead:\n" + "\n".join(many_parameters())


@pytest.mark.parametrize("path", _sources("tests"), ids=lambda p: p.name)
def test_tests_use_public_names_and_no_other_test_file(path):
    source = path.read_text()
    assert not test_imports(source), f"{path.name} imports a test file (share it through conftest.py or helpers.py)"
    assert not private_uses(source), f"{path.name} reaches into private library names: {private_uses(source)}"


# --- the checkers themselves, on made-up code ------------------------------------------------------


def test_the_checkers_find_what_they_look_for(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "flows").mkdir()
    (tmp_path / "bench").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(49))
    (tmp_path / "pipeline" / "big.py").write_text(
        f"def fits(a, b, c, d, e, f):\n{body}\n\n\ndef too_long(self, a, *rest, **options):\n{body}\n    x = 0\n"
        + "\n" * 400)
    (tmp_path / "bench" / "b.py").write_text(f"def main():\n{body}\n{body}\n\n\ndef wide(a, b, c, d, e, f, g):\n    pass\n")
    assert long_modules(tmp_path) == ["pipeline/big.py: 503 lines"]
    assert [line.split(" ", 1)[1] for line in long_functions(tmp_path)] == ["too_long: 51 lines", "main: 99 lines"]
    assert [line.split(" ", 1)[1] for line in many_parameters(tmp_path)] == ["wide: 7 parameters"]
    assert long_modules(tmp_path, limit=503) == []

    source = ("import pipeline.train.stage as train_module\nfrom pipeline import store\nfrom pipeline.audit.checks import _x, ok\n"
              "from tests.test_audit import scored\nimport tests.helpers\n"
              "def test(monkeypatch):\n    store._VERIFIED.clear()\n    train_module._finish()\n"
              "    monkeypatch.setattr(store, '_lock', None)\n    monkeypatch.setattr('pipeline.store._lock', None)\n"
              "    monkeypatch.setattr(store, 'public', None)\n    other._private()\n    store.__name__\n")
    assert sorted(private_uses(source)) == sorted([
        "line 3: from pipeline.audit.checks import _x", "line 7: store._VERIFIED", "line 8: train_module._finish",
        "line 9: setattr(store, '_lock')", "line 10: setattr('pipeline.store._lock')"])
    assert test_imports(source) == ["line 4: tests.test_audit"]
