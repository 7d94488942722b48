"""The layers, checked on the import graph (read with `ast`, nothing is imported or executed).

    flows/cli.py (the parser) -> flows/commands.py -> flows/dpo_flow.py -> stages (pipeline.prepare, ...)
                                                   -> library (every other module of pipeline/, incl. scorers)

(a) pipeline/ never imports flows/; (b) stages never import each other: they meet only in
layout's contract and the files on disk; (c) library modules import no stage; (d) the pipeline
package's import graph has no cycle; (e) flows/dpo_flow.py does not import the command line (flows/cli.py, flows/commands.py,
flows/audit_command.py).

A stage may have modules of its own beside its main one (STAGE_PARTS; pipeline.records and
pipeline.encoder are the prepare stage's, pipeline.audit_tokens the audit's): pipeline.audit_report, the
audit's report and drill-down, is the audit stage's, so it may import pipeline.audit (the checks,
which never import it back: (d)), and for (b) and (c) it counts as that stage: only pipeline.audit
and flows/ may import it.

(d) in two strengths: imports at module level (what runs at import time) have no cycle, and
neither do all imports, those inside functions included (``pipeline.scorers.make_scorer`` imports
the backend it picks lazily; the backends take their shared types from ``scorers.base``, never
from the package that picks them).

Every import counts, wherever it is written (module level, inside functions, under `if`), and
so do `importlib.import_module("...")` calls with a literal name. Relative imports are resolved
against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "flows")
STAGES = {"pipeline.prepare", "pipeline.score", "pipeline.audit", "pipeline.train"}
STAGE_PARTS = {
    "pipeline.audit_report": "pipeline.audit",
    "pipeline.audit_tokens": "pipeline.audit",
    "pipeline.records": "pipeline.prepare",
    "pipeline.encoder": "pipeline.prepare",
    "pipeline.train_data": "pipeline.train",
    "pipeline.train_loss": "pipeline.train",
    "pipeline.final": "pipeline.train",
    "pipeline.trainer": "pipeline.train",
    "pipeline.train_step": "pipeline.train",
}
"""A stage's own modules beside its main one: {module: the stage it belongs to}."""

Edge = tuple[str, str]
Graph = dict[str, dict[str, bool]]  # {module: {imported module: deferred (only inside functions)}}


# --- the graph builder ---------------------------------------------------------------------------


def find_modules(root: Path, packages=PACKAGES) -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} for every .py file of ``packages``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join(parts)] = (path, is_package)
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(package) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _nearest_module(name: str, modules) -> str | None:
    """The module ``name`` refers to: itself, or the longest module prefix (pipeline.store.exclusive
    -> pipeline.store). None when it is outside the packages (torch, os...)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _nodes(tree: ast.AST):
    """Every node with whether it lies inside a function (its code runs only when called)."""
    todo = [(tree, False)]
    while todo:
        node, in_function = todo.pop()
        yield node, in_function
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        todo += [(child, inside) for child in ast.iter_child_nodes(node)]


def imports_of(module: str, path: Path, is_package: bool, modules) -> dict[str, bool]:
    """{module of ``modules`` that ``module`` imports, anywhere in its file: deferred}, deferred
    when every import of it is inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: dict[str, bool] = {}
    for node, in_function in _nodes(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module
            # `from pkg import sub` imports the module pkg.sub; `from mod import name`, just mod.
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.append(sub if sub in modules else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            target = node.args[0].value
            if target.startswith("."):  # relative: resolved against the package argument
                package = node.args[1] if len(node.args) > 1 else None
                if not (isinstance(package, ast.Constant) and isinstance(package.value, str)):
                    continue
                level = len(target) - len(target.lstrip("."))
                target = _resolve_relative(package.value, True, level, target.lstrip(".") or None)
            names.append(target)
        for name in names:
            target = _nearest_module(name, modules)
            if target is not None and target != module:
                found[target] = found.get(target, True) and in_function
    return found


def import_graph(root: Path, packages=PACKAGES) -> Graph:
    """{module: modules of the packages it imports}, for every module of ``packages``."""
    modules = find_modules(root, packages)
    return {name: imports_of(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# --- the checks: each returns the offending edges (empty when the rule holds) -------------------------


def library_imports_flows(graph) -> list[Edge]:
    return sorted((m, t) for m, ts in graph.items() if _in(m, "pipeline") for t in ts if _in(t, "flows"))


def stage_of(module: str, stages=STAGES, parts=STAGE_PARTS) -> str | None:
    """The stage ``module`` is (or is a part of), None for a library module."""
    return module if module in stages else parts.get(module)


def stages_import_stages(graph, stages=STAGES, parts=STAGE_PARTS) -> list[Edge]:
    return sorted((m, t) for m, ts in graph.items() if stage_of(m, stages, parts) for t in ts
                  if stage_of(t, stages, parts) not in (None, stage_of(m, stages, parts)))


def library_imports_stages(graph, stages=STAGES, parts=STAGE_PARTS) -> list[Edge]:
    return sorted((m, t) for m, ts in graph.items()
                  if _in(m, "pipeline") and not stage_of(m, stages, parts) for t in ts if stage_of(t, stages, parts))


def cli_imported_by_flow(graph) -> list[Edge]:
    return sorted((m, t) for m, ts in graph.items() if m == "flows.dpo_flow" for t in ts
                  if t in ("flows.cli", "flows.commands", "flows.audit_command"))


def at_import_time(graph: Graph) -> Graph:
    """Only the imports that run when the module is imported (module level)."""
    return {m: {t: d for t, d in ts.items() if not d} for m, ts in graph.items()}


def find_cycle(graph, package: str = "pipeline") -> list[str] | None:
    """One import cycle among ``package``'s modules, as [a, b, ..., a], or None."""
    nodes = sorted(m for m in graph if _in(m, package))
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(t for t in graph.get(node, ()) if _in(t, package)):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in nodes:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _show(edges: list[Edge]) -> str:
    return "\n".join(f"  {a} imports {b}" for a, b in edges)


# --- the rules, on the real code -------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(ROOT)


def test_the_graph_sees_the_modules_and_their_imports(graph):
    """The builder itself, on edges known to exist: relative, absolute, `from . import x`, and
    imports written inside functions."""
    assert STAGES | {"pipeline", "pipeline.layout", "pipeline.scorers", "pipeline.scorers.vllm",
                     "flows.cli", "flows.dpo_flow"} <= set(graph)
    assert "pipeline.layout" in graph["pipeline.score"]  # from . import layout
    assert "pipeline.config" in graph["pipeline.scorers.vllm"]  # from ..config import Config
    assert graph["pipeline.layout"]["pipeline.scorers"] is True  # only inside plan_refscores_dir()
    assert graph["pipeline.layout"]["pipeline.store"] is False  # at module level
    assert graph["flows.commands"]["flows.dpo_flow"] is True  # only inside cmd_run() and others
    assert "pipeline" in graph["flows.commands"]  # from pipeline import STAGES, distributed, layout
    assert STAGES - {"pipeline.audit"} <= set(graph["flows.commands"])
    assert graph["flows.audit_command"]["pipeline.audit"] is True  # only inside the audit commands
    assert set(STAGE_PARTS) <= set(graph)  # a renamed part fails here, not silently as a library module
    assert graph["pipeline.audit_report"]["pipeline.audit"] is False
    assert "pipeline.audit_report" not in graph["pipeline.audit"]
    # The parser imports the commands only inside main(): `dpo --help` imports no torch.
    assert graph["flows.cli"]["flows.commands"] is True
    assert {target for target, lazy in graph["flows.cli"].items() if not lazy} == {"pipeline"}


def test_pipeline_never_imports_flows(graph):
    edges = library_imports_flows(graph)
    assert not edges, "pipeline/ must not depend on flows/ (Prefect, the command line):\n" + _show(edges)


def test_stages_import_none_of_each_other(graph):
    edges = stages_import_stages(graph)
    assert not edges, "stages meet only through pipeline.layout and the files on disk:\n" + _show(edges)


def test_library_modules_import_no_stage(graph):
    edges = library_imports_stages(graph)
    assert not edges, "a library module (not a stage) imports a stage:\n" + _show(edges)


def test_pipeline_has_no_import_cycle_at_import_time(graph):
    cycle = find_cycle(at_import_time(graph))
    assert cycle is None, "import cycle in pipeline/ at module level: " + " -> ".join(cycle)


def test_pipeline_has_no_import_cycle(graph):
    """Imports inside functions count too: a lazy import is still a dependency."""
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in pipeline/ (imports inside functions included): " + " -> ".join(cycle)


def test_the_flow_does_not_import_the_command_line(graph):
    edges = cli_imported_by_flow(graph)
    assert not edges, "flows/dpo_flow.py must not import the command line:\n" + _show(edges)


# --- the checker catches what it is meant to catch ----------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_report_each_kind_of_violation(tmp_path):
    root = _write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/store.py": "def f():\n    from flows import cli\n",  # (a), inside a function
        "pipeline/prepare.py": "def g():\n    if True:\n        from . import score\n",  # (b), nested
        "pipeline/score.py": "import pipeline.store\n",
        "pipeline/audit.py": "from pipeline.train import x as y\n",  # (b), absolute, a name
        "pipeline/train.py": "x = 1\n",
        "pipeline/layout.py": "import importlib\nm = importlib.import_module('pipeline.audit')\n",  # (c)
        "pipeline/sub/__init__.py": "from .. import prepare\n",  # (c), from a subpackage
        "pipeline/sub/deep.py": "import flows.cli as cli\n",  # (a), a submodule
        "pipeline/a.py": "from .b import thing\n",
        "pipeline/b.py": "def h():\n    import pipeline.a\n",  # (d) a -> b -> a
        "flows/__init__.py": "",
        "flows/cli.py": "from .pipeline import run\n",
        "flows/dpo_flow.py": "def run():\n    from . import cli\n",  # (e)
    })
    graph = import_graph(root)
    assert library_imports_flows(graph) == [("pipeline.store", "flows.cli"), ("pipeline.sub.deep", "flows.cli")]
    assert stages_import_stages(graph) == [("pipeline.audit", "pipeline.train"), ("pipeline.prepare", "pipeline.score")]
    assert library_imports_stages(graph) == [("pipeline.layout", "pipeline.audit"), ("pipeline.sub", "pipeline.prepare")]
    assert find_cycle(graph) == ["pipeline.a", "pipeline.b", "pipeline.a"]
    assert cli_imported_by_flow(graph) == [("flows.dpo_flow", "flows.cli")]
    # The failure messages name the offending edges.
    assert "pipeline.store imports flows.cli" in _show(library_imports_flows(graph))


def test_the_checks_pass_a_clean_layering(tmp_path):
    root = _write(tmp_path, {
        "pipeline/__init__.py": "STAGES = ()\n",
        "pipeline/store.py": "import os\n",
        "pipeline/layout.py": "from . import store\nfrom .store import os\n",
        "pipeline/prepare.py": "from . import layout\nfrom pipeline import STAGES\n",
        "pipeline/score.py": "def f():\n    from .layout import store\n",
        "flows/__init__.py": "",
        "flows/dpo_flow.py": "from pipeline import prepare, score\n",
        "flows/cli.py": "from .pipeline import prepare\n",
    })
    graph = import_graph(root)
    assert graph["pipeline.prepare"] == {"pipeline.layout": False, "pipeline": False}
    assert graph["pipeline.score"] == {"pipeline.layout": True}  # only inside a function
    assert graph["flows.dpo_flow"] == {"pipeline.prepare": False, "pipeline.score": False}
    assert not (library_imports_flows(graph) or stages_import_stages(graph) or library_imports_stages(graph)
                or cli_imported_by_flow(graph))
    assert find_cycle(graph) is None


def test_a_stages_own_module_counts_as_that_stage(tmp_path):
    """pipeline.audit_report may import pipeline.audit (its stage) and the library; a library
    module or another stage that imports it imports the audit stage; it may not import another stage."""
    root = _write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/layout.py": "",
        "pipeline/audit.py": "from . import layout\n",
        "pipeline/audit_report.py": "from .audit import x\nfrom . import layout\ndef f():\n    from . import train\n",
        "pipeline/train.py": "from pipeline import audit_report\n",
        "pipeline/store.py": "from .audit_report import y\n",
        "flows/__init__.py": "",
        "flows/commands.py": "from pipeline import audit, audit_report\n",
    })
    graph = import_graph(root)
    assert stages_import_stages(graph) == [("pipeline.audit_report", "pipeline.train"),
                                           ("pipeline.train", "pipeline.audit_report")]
    assert library_imports_stages(graph) == [("pipeline.store", "pipeline.audit_report")]
    # Without STAGE_PARTS it would be a library module, and its import of its own stage a violation.
    assert library_imports_stages(graph, parts={}) == [("pipeline.audit_report", "pipeline.audit"),
                                                       ("pipeline.audit_report", "pipeline.train")]


def test_cycles_at_import_time_and_through_functions(tmp_path):
    """A cycle closed inside a function is found by the full check only (a package's lazy import
    of its own submodule that imports the package back is one); a module-level cycle by both."""
    lazy = _write(tmp_path / "lazy", {
        "pipeline/__init__.py": "",
        "pipeline/a.py": "from .b import thing\n",
        "pipeline/b.py": "thing = 1\ndef h():\n    from pipeline import a\n",
        "pipeline/reg/__init__.py": "class Base: ...\ndef make():\n    from .impl import Impl\n    return Impl()\n",
        "pipeline/reg/impl.py": "from . import Base\nclass Impl(Base): ...\n",
    })
    graph = import_graph(lazy, packages=("pipeline",))
    assert graph["pipeline.b"] == {"pipeline.a": True} and graph["pipeline.a"] == {"pipeline.b": False}
    assert find_cycle(at_import_time(graph)) is None
    assert find_cycle(graph) == ["pipeline.a", "pipeline.b", "pipeline.a"]
    del graph["pipeline.b"]["pipeline.a"]
    assert find_cycle(graph) == ["pipeline.reg", "pipeline.reg.impl", "pipeline.reg"]

    eager = _write(tmp_path / "eager", {
        "pipeline/__init__.py": "",
        "pipeline/c.py": "import pipeline.d\n",
        "pipeline/d.py": "from . import c\n",
    })
    graph = import_graph(eager, packages=("pipeline",))
    assert find_cycle(at_import_time(graph)) == ["pipeline.c", "pipeline.d", "pipeline.c"]
    assert find_cycle(graph) == ["pipeline.c", "pipeline.d", "pipeline.c"]
