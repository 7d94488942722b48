"""The layers, checked on the import graph (read with `ast`, nothing is imported or executed).

    flows/cli/ (the `dpo` command) -> flows/ (Prefect flows and plans) -> stages -> library
    stages:  pipeline/prepare/, pipeline/score/, pipeline/audit/, pipeline/train/ (pipeline.STAGES),
             pipeline/generate/, pipeline/judge/ (pipeline.ROUND_STAGES: iterative DPO's)
    library: every other package and module of pipeline/ (config/, models/, logprobs/, storage/,
             reports/, store.py, data.py, errors.py, progress.py)

The folders say which module belongs to which stage: a stage is the package pipeline/<name>/ of
each name in pipeline.STAGES (read from pipeline/__init__.py), and every module inside it is that
stage's. (a) pipeline/ never imports flows/; (b) stages never import each other: they meet only
in pipeline.storage's contract and the files on disk; (c) library modules import no stage; (d) the
pipeline package's import graph has no cycle, and neither has the graph of its rooms (a top-level
module or a subpackage: the arrows between folders go one way); (e) the Prefect flows (flows/,
outside flows/cli/) do not import the command line.

(d) in two strengths: imports at module level (what runs at import time) have no cycle, and
neither do all imports, those inside functions included (``pipeline.logprobs.backends.make_scorer``
imports the backend it picks lazily; the backends take their shared types from ``backends.base``,
never from the package that picks them).

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
CLI = "flows.cli"

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


def stages_in(root: Path) -> set[str]:
    """The stage packages: pipeline/<name>/ for each name of ``STAGES`` and ``ROUND_STAGES`` in
    pipeline/__init__.py."""
    tree = ast.parse((root / "pipeline" / "__init__.py").read_text(encoding="utf-8"))
    names = [name for node in tree.body if isinstance(node, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id in ("STAGES", "ROUND_STAGES") for t in node.targets)
             for name in ast.literal_eval(node.value)]
    return {f"pipeline.{name}" for name in names if (root / "pipeline" / name / "__init__.py").is_file()}


def stage_of(module: str, stages: set[str]) -> str | None:
    """The stage whose folder holds ``module``, None for a library module."""
    return next((stage for stage in stages if _in(module, stage)), None)


def stages_import_stages(graph, stages: set[str]) -> list[Edge]:
    return sorted((m, t) for m, ts in graph.items() if stage_of(m, stages) for t in ts
                  if stage_of(t, stages) not in (None, stage_of(m, stages)))


def library_imports_stages(graph, stages: set[str]) -> list[Edge]:
    return sorted((m, t) for m, ts in graph.items()
                  if _in(m, "pipeline") and not stage_of(m, stages) for t in ts if stage_of(t, stages))


def cli_imported_by_flows(graph) -> list[Edge]:
    return sorted((m, t) for m, ts in graph.items() if _in(m, "flows") and not _in(m, CLI) for t in ts
                  if _in(t, CLI))


def room_of(module: str) -> str:
    """pipeline.storage.locate -> pipeline.storage; pipeline.store -> pipeline.store; pipeline -> pipeline."""
    return ".".join(module.split(".")[:2])


def rooms(graph: Graph, package: str = "pipeline") -> Graph:
    """The graph between rooms (a top-level module or a subpackage of ``package``); the package's
    own __init__ (STAGES, __version__) is the floor everything may stand on, not a room."""
    found: Graph = {}
    for module, targets in graph.items():
        if not _in(module, package) or module == package:
            continue
        room = found.setdefault(room_of(module), {})
        for target, deferred in targets.items():
            if _in(target, package) and target != package and room_of(target) != room_of(module):
                room[room_of(target)] = room.get(room_of(target), True) and deferred
    return found


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


@pytest.fixture(scope="module")
def stages() -> set[str]:
    return stages_in(ROOT)


def test_the_graph_sees_the_modules_and_their_imports(graph, stages):
    """The builder itself, on edges known to exist: absolute, `from package import module`, and
    imports written inside functions; the stages are the folders named by pipeline.STAGES and
    pipeline.ROUND_STAGES."""
    assert stages == {"pipeline.prepare", "pipeline.score", "pipeline.audit", "pipeline.train",
                      "pipeline.generate", "pipeline.judge"}
    assert stages | {"pipeline", "pipeline.storage.locate", "pipeline.logprobs.backends",
                     "pipeline.logprobs.backends.vllm", "flows.cli.main", "flows.dpo_flow"} <= set(graph)
    assert "pipeline.storage.locate" in graph["pipeline.score.stage"]  # from pipeline.storage import locate
    assert "pipeline.config.schema" in graph["pipeline.logprobs.backends.vllm"]
    assert graph["flows.cli.commands"]["flows.dpo_flow"] is True  # only inside cmd_run() and others
    assert graph["flows.cli.audit_command"]["pipeline.audit.checks"] is True  # only inside the audit commands
    assert stage_of("pipeline.audit.report", stages) == "pipeline.audit"
    assert graph["pipeline.audit.report"]["pipeline.audit.checks"] is False
    assert "pipeline.audit.report" not in graph["pipeline.audit.checks"]
    # main() imports the commands only once the arguments are parsed: `dpo --help` imports no torch.
    assert graph["flows.cli.main"]["flows.cli.commands"] is True
    assert all(lazy or target in ("pipeline", "flows.cli.parser") for target, lazy in graph["flows.cli.main"].items())


def test_pipeline_never_imports_flows(graph):
    edges = library_imports_flows(graph)
    assert not edges, "pipeline/ must not depend on flows/ (Prefect, the command line):\n" + _show(edges)


def test_stages_import_none_of_each_other(graph, stages):
    edges = stages_import_stages(graph, stages)
    assert not edges, "stages meet only through pipeline.storage and the files on disk:\n" + _show(edges)


def test_library_modules_import_no_stage(graph, stages):
    edges = library_imports_stages(graph, stages)
    assert not edges, "a library module (not a stage) imports a stage:\n" + _show(edges)


def test_pipeline_has_no_import_cycle_at_import_time(graph):
    cycle = find_cycle(at_import_time(graph))
    assert cycle is None, "import cycle in pipeline/ at module level: " + " -> ".join(cycle)


def test_pipeline_has_no_import_cycle(graph):
    """Imports inside functions count too: a lazy import is still a dependency."""
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in pipeline/ (imports inside functions included): " + " -> ".join(cycle)


def test_the_rooms_have_no_cycle(graph):
    """Between folders too, the arrows go one way: storage may stand on models, never the reverse."""
    cycle = find_cycle(rooms(graph))
    assert cycle is None, "import cycle between pipeline/'s packages and modules: " + " -> ".join(cycle)


def test_the_flows_do_not_import_the_command_line(graph):
    edges = cli_imported_by_flows(graph)
    assert not edges, "the Prefect flows (flows/) must not import the command line (flows/cli/):\n" + _show(edges)


# --- the checker catches what it is meant to catch ----------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_report_each_kind_of_violation(tmp_path):
    root = _write(tmp_path, {
        "pipeline/__init__.py": "STAGES = ('prepare', 'score', 'audit', 'train')\n",
        "pipeline/store.py": "def f():\n    from flows.cli import main\n",  # (a), inside a function
        "pipeline/prepare/__init__.py": "",
        "pipeline/prepare/stage.py": "def g():\n    if True:\n        from ..score import stage\n",  # (b), nested
        "pipeline/score/__init__.py": "",
        "pipeline/score/stage.py": "import pipeline.store\n",
        "pipeline/audit/__init__.py": "",
        "pipeline/audit/checks.py": "from pipeline.train.stage import x as y\n",  # (b), absolute, a name
        "pipeline/train/__init__.py": "",
        "pipeline/train/stage.py": "x = 1\n",
        "pipeline/storage/__init__.py": "",
        "pipeline/storage/locate.py": "import importlib\nm = importlib.import_module('pipeline.audit.checks')\n",  # (c)
        "pipeline/sub/__init__.py": "from .. import prepare\n",  # (c), from a subpackage
        "pipeline/sub/deep.py": "import flows.cli.main as cli\n",  # (a), a submodule
        "pipeline/a.py": "from .b import thing\n",
        "pipeline/b.py": "def h():\n    import pipeline.a\n",  # (d) a -> b -> a
        "flows/__init__.py": "",
        "flows/cli/__init__.py": "",
        "flows/cli/main.py": "from flows.dpo_flow import run\n",
        "flows/dpo_flow.py": "def run():\n    from .cli import main\n",  # (e)
    })
    graph, stages = import_graph(root), stages_in(root)
    assert stages == {"pipeline.prepare", "pipeline.score", "pipeline.audit", "pipeline.train"}
    assert library_imports_flows(graph) == [("pipeline.store", "flows.cli.main"), ("pipeline.sub.deep", "flows.cli.main")]
    assert stages_import_stages(graph, stages) == [("pipeline.audit.checks", "pipeline.train.stage"),
                                                   ("pipeline.prepare.stage", "pipeline.score.stage")]
    assert library_imports_stages(graph, stages) == [("pipeline.storage.locate", "pipeline.audit.checks"),
                                                     ("pipeline.sub", "pipeline.prepare")]
    assert find_cycle(graph) == ["pipeline.a", "pipeline.b", "pipeline.a"]
    assert cli_imported_by_flows(graph) == [("flows.dpo_flow", "flows.cli.main")]
    # The failure messages name the offending edges.
    assert "pipeline.store imports flows.cli.main" in _show(library_imports_flows(graph))


def test_the_checks_pass_a_clean_layering(tmp_path):
    root = _write(tmp_path, {
        "pipeline/__init__.py": "STAGES = ('prepare', 'score')\n",
        "pipeline/store.py": "import os\n",
        "pipeline/storage/__init__.py": "",
        "pipeline/storage/locate.py": "from pipeline import store\nfrom ..store import os\n",
        "pipeline/prepare/__init__.py": "",
        "pipeline/prepare/stage.py": "from pipeline.storage import locate\nfrom pipeline import STAGES\n",
        "pipeline/prepare/records.py": "from . import stage\n",
        "pipeline/score/__init__.py": "",
        "pipeline/score/stage.py": "def f():\n    from ..storage.locate import store\n",
        "flows/__init__.py": "",
        "flows/dpo_flow.py": "from pipeline.prepare import stage\nfrom pipeline.score.stage import f\n",
        "flows/cli/__init__.py": "",
        "flows/cli/main.py": "from flows.dpo_flow import stage\n",
    })
    graph, stages = import_graph(root), stages_in(root)
    assert graph["pipeline.prepare.stage"] == {"pipeline.storage.locate": False, "pipeline": False}
    assert graph["pipeline.score.stage"] == {"pipeline.storage.locate": True}  # only inside a function
    assert graph["flows.dpo_flow"] == {"pipeline.prepare.stage": False, "pipeline.score.stage": False}
    assert not (library_imports_flows(graph) or stages_import_stages(graph, stages)
                or library_imports_stages(graph, stages) or cli_imported_by_flows(graph))
    assert find_cycle(graph) is None and find_cycle(rooms(graph)) is None


def test_a_stages_own_modules_are_the_folder_its_stage_is(tmp_path):
    """pipeline/audit/report.py may import pipeline/audit/checks.py (its stage) and the library; a
    library module or another stage that imports it imports the audit stage. A folder not named in
    STAGES is library, whatever it holds."""
    root = _write(tmp_path, {
        "pipeline/__init__.py": "STAGES = ('audit', 'train', 'ghost')\n",
        "pipeline/storage/__init__.py": "",
        "pipeline/storage/locate.py": "",
        "pipeline/audit/__init__.py": "",
        "pipeline/audit/checks.py": "from pipeline.storage import locate\n",
        "pipeline/audit/report.py": "from .checks import x\nfrom pipeline.storage import locate\ndef f():\n    from ..train import stage\n",
        "pipeline/train/__init__.py": "",
        "pipeline/train/stage.py": "from pipeline.audit import report\n",
        "pipeline/reports/__init__.py": "",
        "pipeline/reports/run.py": "from pipeline.audit.report import y\n",
        "flows/__init__.py": "",
        "flows/cli/__init__.py": "",
        "flows/cli/commands.py": "from pipeline.audit import checks, report\n",
    })
    graph, stages = import_graph(root), stages_in(root)
    assert stages == {"pipeline.audit", "pipeline.train"}  # no folder: no stage
    assert stages_import_stages(graph, stages) == [("pipeline.audit.report", "pipeline.train.stage"),
                                                   ("pipeline.train.stage", "pipeline.audit.report")]
    assert library_imports_stages(graph, stages) == [("pipeline.reports.run", "pipeline.audit.report")]
    # Were the audit not a stage, its folder would be library, and its import of train a violation.
    assert library_imports_stages(graph, {"pipeline.train"}) == [("pipeline.audit.report", "pipeline.train.stage")]


def test_a_cycle_between_folders_is_found_where_the_modules_have_none(tmp_path):
    """storage.locate -> models.loading -> storage.paths: no module imports itself back, but the
    folders storage/ and models/ stand on each other."""
    root = _write(tmp_path, {
        "pipeline/__init__.py": "STAGES = ()\n",
        "pipeline/storage/__init__.py": "",
        "pipeline/storage/locate.py": "from pipeline.models import loading\n",
        "pipeline/storage/paths.py": "",
        "pipeline/models/__init__.py": "",
        "pipeline/models/loading.py": "def f():\n    from pipeline.storage import paths\n",
        "pipeline/store.py": "from pipeline import STAGES\n",
        "flows/__init__.py": "",
    })
    graph = import_graph(root)
    assert find_cycle(graph) is None
    assert rooms(graph)["pipeline.models"] == {"pipeline.storage": True}
    assert find_cycle(rooms(graph)) == ["pipeline.models", "pipeline.storage", "pipeline.models"]


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
