"""The Prefect settings (flows/prefect_settings.py): one function applies them, every command that
starts Prefect applies it before Prefect is imported, `dpo demo` completes on a machine whose cores
are busy, and no process of a command tries to reach the network (telemetry off everywhere)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.prefect_settings import PREFECT_SETTINGS, apply_prefect_settings

ROOT = Path(__file__).resolve().parents[2]
DPO = str(Path(sys.executable).parent / "dpo")
EXITED_AT_PREFECT_IMPORT = 97

# Loaded by every Python process of a command (a sitecustomize on PYTHONPATH, inherited by the
# processes it starts: Prefect's ephemeral API server, the score child): one JSON line per event
# into $DPO_TEST_HOOK_LOG/<pid>.jsonl. Records the Prefect settings in the environment at the moment
# prefect is first imported (and, with DPO_TEST_EXIT_AT_PREFECT=1, ends the process there), and
# every attempt to reach a host that is not this machine's loopback (connect, sendto, name
# lookups), which it also refuses: nothing leaves the machine even when the check fails.
HOOK = r'''
import ipaddress, json, os, sys

_LOG = os.environ["DPO_TEST_HOOK_LOG"]
_NAMES = json.loads(os.environ["DPO_TEST_HOOK_SETTINGS"])


def _write(record):
    with open(os.path.join(_LOG, "%d.jsonl" % os.getpid()), "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "argv": list(getattr(sys, "argv", [])), **record}) + "\n")


def _loopback(host):
    if host is None:
        return True  # getaddrinfo(None, port): a local bind
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode(errors="replace")
    host = str(host).split("%")[0]
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name to look up: the network


def _audit(event, args):
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        address = args[1]
        if not isinstance(address, tuple) or not address:
            return  # AF_UNIX and other local families
        host = address[0]
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                   "socket.gethostbyname_ex"):
        host = args[0]
    else:
        return
    if not _loopback(host):
        _write({"network": event, "host": repr(host)})
        raise OSError("network access refused by tests/flows/test_prefect_settings.py: %s %r" % (event, host))


class _WatchPrefect:
    seen = False  # (not removed from sys.meta_path while the import system walks it)

    def find_spec(self, name, path=None, target=None):
        if name == "prefect" and not self.seen:
            self.seen = True
            _write({"prefect_import": {n: os.environ.get(n) for n in _NAMES}})
            if os.environ.get("DPO_TEST_EXIT_AT_PREFECT") == "1":
                os._exit(EXIT_STATUS)
        return None


sys.addaudithook(_audit)
sys.meta_path.insert(0, _WatchPrefect())
'''.replace("EXIT_STATUS", str(EXITED_AT_PREFECT_IMPORT))


def hooked_env(tmp_path: Path, **extra: str) -> tuple[dict, Path]:
    """An environment without the user's Prefect settings (so the command's own must show), a
    fresh PREFECT_HOME, no Prefect server (the ephemeral API), and the hook; and its log folder."""
    hook_dir, log_dir = tmp_path / "hook", tmp_path / "hook-log"
    hook_dir.mkdir()
    log_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), DPO_TEST_HOOK_LOG=str(log_dir),
               DPO_TEST_HOOK_SETTINGS=json.dumps(sorted(PREFECT_SETTINGS)),
               PYTHONPATH=os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])), **extra)
    return env, log_dir


def hook_records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(log_dir.glob("*.jsonl")) for line in path.read_text().splitlines()]


def demo_storage(tmp_path: Path, demo_assets: dict) -> Path:
    """A storage folder whose demo assets are already built (`dpo demo` reuses them)."""
    storage = tmp_path / "storage"
    shutil.copytree(Path(demo_assets["model"]).parent, storage / "demo")
    return storage


# --- one function ---------------------------------------------------------------------------------


def test_the_settings_are_defaults_the_users_win(monkeypatch):
    for name in PREFECT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
    apply_prefect_settings()
    assert {n: os.environ[n] for n in PREFECT_SETTINGS} == {**PREFECT_SETTINGS,
                                                            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
    assert PREFECT_SETTINGS["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and PREFECT_SETTINGS["DO_NOT_TRACK"] == "1"


def test_the_names_are_prefects_own_settings(monkeypatch):
    """Each PREFECT_* name is one Prefect reads (a misspelt one would be ignored without a word):
    Prefect's settings built from exactly these values have them."""
    for name, value in PREFECT_SETTINGS.items():
        monkeypatch.setenv(name, value)
    from prefect.settings import Settings

    settings = Settings()
    assert settings.server.analytics_enabled is False
    assert settings.cloud.enable_orchestration_telemetry is False
    assert settings.server.ephemeral.startup_timeout_seconds == int(
        PREFECT_SETTINGS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 300
    assert {n for n in PREFECT_SETTINGS if n.startswith("PREFECT_")} <= set(settings.to_environment_variables())


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def _imports_prefect(node: ast.AST) -> bool:
    """An import of prefect, or of a flow module (flows/dpo_flow.py, flows/sweep_flow.py,
    flows/rounds_flow.py: they import prefect), in ``node``."""
    flow_modules = ("dpo_flow", "sweep_flow", "rounds_flow")
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import) and any(a.name.split(".")[0] in ("prefect",)
                                               or a.name in [f"flows.{m}" for m in flow_modules] for a in sub.names):
            return True
        if isinstance(sub, ast.ImportFrom):
            module = sub.module or ""
            if sub.level == 0 and (module.split(".")[0] == "prefect" or module.removeprefix("flows.") in flow_modules
                                   or (module == "flows" and any(a.name in flow_modules for a in sub.names))):
                return True
            if sub.level == 1 and (module in flow_modules or (not module and any(a.name in flow_modules
                                                                                 for a in sub.names))):
                return True
    return False


def test_every_command_that_reaches_prefect_applies_the_settings():
    """flows/cli/commands.py, read: a command whose function imports prefect or flows.dpo_flow, itself
    or through the module's functions it calls (cmd_serve -> _deploy), is marked @starts_prefect,
    and a command marked so does reach Prefect."""
    tree = ast.parse((ROOT / "flows" / "cli" / "commands.py").read_text())
    functions = _functions(tree)
    table = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in node.targets))
    commands = {key.value: value.id for key, value in zip(table.keys, table.values)}
    assert {"run", "serve", "demo", "prepare", "score", "train", "status", "audit"} <= set(commands)
    calls = {name: {n.id for n in ast.walk(f) if isinstance(n, ast.Name) and n.id in functions and n.id != name}
             for name, f in functions.items()}
    reaches = {name for name, f in functions.items() if _imports_prefect(f)}
    while grown := {name for name in functions if name not in reaches and calls[name] & reaches}:
        reaches |= grown
    marked = {name for name, f in functions.items()
              if any(isinstance(d, ast.Name) and d.id == "starts_prefect" for d in f.decorator_list)}
    starting = {command for command, function in commands.items() if function in reaches}
    assert starting >= {"run", "serve", "demo"}  # the analysis sees them
    assert {command: commands[command] in marked for command in commands} == \
        {command: command in starting for command in commands}
    assert not _imports_prefect(ast.Module(body=[n for n in tree.body if not isinstance(n, ast.FunctionDef)],
                                           type_ignores=[]))  # nothing at module level


def test_no_flows_module_but_the_flow_imports_prefect_when_imported():
    """Only the flow modules (flows/dpo_flow.py, flows/sweep_flow.py, flows/rounds_flow.py) import prefect at module
    level; the command line's parser and main (flows/cli/) and the plans not at all; the other modules of flows/
    only inside the functions the test above checks."""
    for source in sorted((ROOT / "flows").rglob("*.py")):
        name = source.relative_to(ROOT / "flows").as_posix()
        tree = ast.parse(source.read_text())
        top = ast.Module(body=[n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))],
                         type_ignores=[])
        if name in ("dpo_flow.py", "sweep_flow.py", "rounds_flow.py"):
            continue
        assert not _imports_prefect(top), f"flows/{name} imports prefect when imported"
        if name in ("cli/main.py", "cli/parser.py", "cli/rounds_commands.py", "prefect_settings.py", "params.py",
                    "plan.py", "sweep_plan.py", "rounds_plan.py"):
            assert not _imports_prefect(tree), f"flows/{name} imports prefect"


# --- the commands, run --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "serve", "demo"])
def test_each_command_has_the_settings_when_it_imports_prefect(command, tmp_path, demo_assets):
    """`dpo run`, `dpo serve`, `dpo demo` from an environment without any of the settings: when
    the process first imports prefect, they are all there (the process ends at that moment)."""
    env, log_dir = hooked_env(tmp_path, DPO_TEST_EXIT_AT_PREFECT="1")
    missing = str(tmp_path / "missing.yaml")  # run and serve import Prefect before reading it
    argv = {"run": ["run", "-c", missing, "--no-progress"],
            "serve": ["serve", "-c", missing, "--cron", "0 3 * * *"],
            "demo": ["demo", "--storage", str(demo_storage(tmp_path, demo_assets)), "--no-progress"]}[command]
    done = subprocess.run([DPO, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == EXITED_AT_PREFECT_IMPORT, done.stderr[-3000:]
    imports = [r["prefect_import"] for r in hook_records(log_dir) if "prefect_import" in r]
    assert imports == [PREFECT_SETTINGS]


def test_serve_without_a_server_reaches_no_network(tmp_path):
    """`dpo serve` with only the ephemeral API refuses, saying how to start a server, with the
    settings applied and no connection attempted."""
    config = tmp_path / "run.yaml"
    config.write_text(f"storage: {tmp_path / 'storage'}\ndata:\n  path: d.jsonl\nmodel:\n  path: m\n")
    env, log_dir = hooked_env(tmp_path)
    done = subprocess.run([DPO, "serve", "-c", str(config), "--cron", "0 3 * * *"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 1 and "prefect server start --host 127.0.0.1" in done.stderr, done.stderr[-3000:]
    records = hook_records(log_dir)
    assert [r for r in records if "network" in r] == []
    assert [r["prefect_import"] for r in records if "prefect_import" in r] == [PREFECT_SETTINGS]


def test_the_hook_sees_and_refuses_a_connection(tmp_path):
    """The network check itself: an attempt to reach a non-loopback address (TEST-NET-1, refused
    before any packet) is recorded; loopback is allowed."""
    env, log_dir = hooked_env(tmp_path)
    probe = ("import socket\n"
             "s = socket.socket()\n"
             "try:\n    s.connect(('192.0.2.1', 9))\nexcept OSError as e:\n    print('refused' if 'refused by tests' in str(e) else e)\n"
             "l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()\n"
             "socket.create_connection(l.getsockname()).close()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "refused", done.stderr
    assert [(r["network"], r["host"]) for r in hook_records(log_dir) if "network" in r] == \
        [("socket.connect", "'192.0.2.1'")]


def _busy_cores(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _same_settings(seen: dict) -> bool:
    """The settings as a process saw them (Prefect hands its server "False" for "false")."""
    return {k: str(v).lower() for k, v in seen.items()} == {k: v.lower() for k, v in PREFECT_SETTINGS.items()}


@pytest.mark.slow  # minutes: the demo's flow with a fresh Prefect home, on a machine whose cores are taken
def test_demo_flow_completes_on_busy_cores_and_reaches_no_network(tmp_path, demo_assets):
    """`make demo` on a fresh clone of a loaded 2-core machine: the flow `dpo demo` runs (its
    config, training cut to 6 steps: the demo has no option for it) run by `dpo run`, with a fresh
    PREFECT_HOME (the ephemeral server creates its database first, seen to take over a minute here)
    while two CPU-bound processes keep both cores busy, completes; no process of it (the command,
    Prefect's ephemeral server, the score child) tries to reach any host but this machine's
    loopback, and each that imports prefect has the settings. (`dpo demo` itself applies them:
    test_each_command_has_the_settings_when_it_imports_prefect.)"""
    from pipeline.models.assets import DEMO_TRAIN

    config = tmp_path / "demo.yaml"  # cmd_demo's config
    config.write_text(json.dumps({
        "storage": str(tmp_path / "storage"),
        "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.1},
        "model": {"path": str(demo_assets["model"])},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "train": {**DEMO_TRAIN, "max_steps": 6, "warmup_steps": 1, "eval_steps": 3, "save_steps": 3},
    }))
    env, log_dir = hooked_env(tmp_path)
    busy = _busy_cores(2)
    try:
        start = time.monotonic()
        done = subprocess.run([DPO, "run", "-c", str(config), "--no-progress"], capture_output=True, text=True,
                              env=env, timeout=1800)
        seconds = time.monotonic() - start
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert done.returncode == 0, done.stderr[-5000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    assert run_dir == tmp_path / "storage" / "runs" / "demo" and (run_dir / "run.json").is_file()
    records = hook_records(log_dir)
    assert [r for r in records if "network" in r] == []
    imports = [r for r in records if "prefect_import" in r]
    assert any("uvicorn" in " ".join(r["argv"]) for r in imports), imports  # the ephemeral server
    assert all(_same_settings(r["prefect_import"]) for r in imports), imports
    print(f"the demo's flow on busy cores: {seconds:.0f} s")
