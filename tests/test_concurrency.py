"""Two real `dpo` processes on the same output: one writer per output directory.

Every stage holds an exclusive lock on its output (``store.exclusive``) for the whole time it
writes. prepare and score wait for the holder and then find the output done; train refuses at
once, naming the holder's pid. Each test starts two real processes (``python -m flows.cli``) on
the same storage, together or a little apart, and compares what they leave with a single run's
output made in another storage (in this process): byte for byte, or one of them refused cleanly.
Plus: a lock held by a process killed with SIGKILL blocks nobody, temporary files of dead writers
are removed by the next run (under the lock), and unusable storage is a one-line error.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config.load import config_from_dict
from pipeline.models.assets import demo_preferences
from pipeline.prepare.stage import prepare
from pipeline.score.stage import score
from pipeline.storage import paths
from pipeline.store import lock_path
from pipeline.train.stage import train

from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # seconds for any one process; a hang fails the test instead of blocking it
ROWS = 40
LR_A, LR_B = 0.001, 0.003

# Takes the lock at argv[1] the way a stage does, says so, and holds it until killed.
HOLDER = """
import sys, time
from pipeline.store import exclusive
with exclusive(sys.argv[1], "lock holder of the test", wait=False):
    print("locked", flush=True)
    time.sleep(600)
"""


def _env() -> dict:
    """The worktree's code wins in every child process (not the console script's checkout)."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@dataclass
class Done:
    name: str
    pid: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""


class Proc:
    """A `python -m flows.cli ...` child whose stdout and stderr go to files (no pipe can fill)."""

    def __init__(self, logs: Path, name: str, *args: str):
        self.name = name
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        extra = [] if args[0] == "audit" else ["--no-progress"]  # audit shows no progress bars
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.popen = subprocess.Popen([sys.executable, "-m", "flows.cli", *args, *extra],
                                          stdout=out, stderr=err, env=_env(), cwd=logs)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr_so_far(self) -> str:
        return self.err.read_text(errors="replace")

    def wait(self) -> Done:
        try:
            code = self.popen.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            pytest.fail(f"{self.name} did not finish within {TIMEOUT} s:\n{self.stderr_so_far()}")
        return Done(self.name, self.pid, code, self.out.read_text(), self.err.read_text())


def wait_for(condition, what: str, timeout: float = TIMEOUT, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            if p.popen.poll() is not None and not condition():
                pytest.fail(f"{p.name} ended (exit {p.popen.returncode}) before {what}:\n{p.stderr_so_far()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def start_pair(logs: Path, first: list[str], second: list[str], stagger) -> tuple[Done, Done]:
    """Start ``first``, then ``second`` after ``stagger`` seconds (or once ``stagger()`` is true)."""
    a = Proc(logs, "a", *first)
    try:
        if callable(stagger):
            wait_for(stagger, "the first process to be mid-write", procs=[a])
        elif stagger:
            time.sleep(stagger)
        b = Proc(logs, "b", *second)
    except BaseException:
        a.popen.kill()
        a.popen.wait()
        raise
    return a.wait(), b.wait()


class Holder:
    """A process that holds a stage's lock, as a writer would, until it is killed with SIGKILL."""

    def __init__(self, lock: Path):
        self.popen = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=_env(), text=True)
        ready, _, _ = select.select([self.popen.stdout], [], [], TIMEOUT)
        line = self.popen.stdout.readline() if ready else ""
        if line.strip() != "locked":
            self.kill()
            pytest.fail(f"the lock holder did not take {lock}: {self.popen.stderr.read()}")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=TIMEOUT)
        self.popen.stdout.close()
        self.popen.stderr.close()


def assert_clean(done: Done) -> None:
    assert "Traceback" not in done.stderr, f"{done.name}:\n{done.stderr}"


def tmp_leftovers(storage: Path) -> list[Path]:
    return sorted(p for p in storage.rglob(".tmp-*"))


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def without(manifest: dict, *keys: str) -> dict:
    return {k: v for k, v in manifest.items() if k not in keys}


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens/s", "seconds")} for r in rows]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / paths.METRICS).read_text().splitlines()]


class Setup:
    """Shared inputs, config files and the single-process reference outputs (made in-process)."""

    def __init__(self, root: Path, model: Path):
        self.root = root
        self.model = model
        self.data = write_jsonl(root / "prefs.jsonl", demo_preferences(ROWS))
        self.ref_storage = root / "reference"
        cfg = config_from_dict(self.raw(self.ref_storage))
        self.dataset = prepare(cfg, show_progress=False).output_dir
        self.cache = score(cfg, show_progress=False).output_dir
        self._runs: dict[float, Path] = {}

    def raw(self, storage: Path, lr: float = LR_A, run_name: str = "r") -> dict:
        return {
            "storage": str(storage),
            "data": {"path": str(self.data), "eval_fraction": 0.1},
            "model": {"path": str(self.model)},
            "tokenize": {"max_length": 128, "max_prompt_length": 64},
            "score": {"shard_rows": 5},  # 8 shards: many writes for a second process to disturb
            "train": {"learning_rate": lr, "beta": 0.1, "per_device_train_batch_size": 4, "max_steps": 6, "warmup_steps": 1,
                      "eval_steps": 3, "save_steps": 2, "run_name": run_name},
        }

    def config_file(self, storage: Path) -> str:
        path = storage.parent / f"{storage.name}.yaml"
        path.write_text(json.dumps(self.raw(storage)))
        return str(path)

    def reference_run(self, lr: float) -> Path:
        """A run trained alone with this lr (in the reference storage; same identity but its name)."""
        if lr not in self._runs:
            cfg = config_from_dict(self.raw(self.ref_storage, lr=lr, run_name=f"alone-{lr}"))
            self._runs[lr] = train(cfg, show_progress=False).run_dir
        return self._runs[lr]

    def storage_with(self, storage: Path, *kinds: str) -> Path:
        """A fresh storage holding copies of the reference outputs of these kinds."""
        for kind in kinds:
            shutil.copytree(self.ref_storage / kind, storage / kind)
        return storage


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_assets) -> Setup:
    return Setup(tmp_path_factory.mktemp("concurrency"), demo_assets["model"])


# --- prepare: the second waits, then finds the dataset done ---------------------------------------


@pytest.mark.parametrize("stagger", [0.0, 0.5])
def test_two_prepares_write_one_dataset_equal_to_a_single_run(setup, tmp_path, stagger):
    storage = tmp_path / "storage"
    config = setup.config_file(storage)
    # A writer killed with SIGKILL while holding the dataset's lock blocks nobody (an OS lock).
    holder = Holder(lock_path(storage, "datasets", setup.dataset.name))
    holder.kill()

    a, b = start_pair(tmp_path, ["prepare", "-c", config], ["prepare", "-c", config], stagger)
    for done in (a, b):
        assert done.returncode == 0, done.stderr
        assert_clean(done)
        assert done.output == str(storage / "datasets" / setup.dataset.name)
    # One wrote it; the other waited for the lock (or came after) and found it done.
    statuses = sorted("done" if "prepare: done:" in d.stderr else "up to date" if "prepare: up to date:" in d.stderr
                      else "?" for d in (a, b))
    assert statuses == ["done", "up to date"], a.stderr + b.stderr
    assert [d.name for d in (storage / "datasets").iterdir()] == [setup.dataset.name]
    out = storage / "datasets" / setup.dataset.name
    got, expected = file_bytes(out), file_bytes(setup.dataset)
    assert sorted(got) == sorted(expected) == ["examples.parquet", "manifest.json", "rejects.parquet"]
    for name in ("examples.parquet", "rejects.parquet"):
        assert got[name] == expected[name], f"{name} differs from a single run's"
    # The manifest differs from a single run's only in how long the run took.
    assert without(json.loads(got["manifest.json"]), "seconds") == without(json.loads(expected["manifest.json"]), "seconds")
    assert tmp_leftovers(storage) == []


# --- score: the second waits, then finds the cache done ----------------------------------------


def _first_shard_written(storage: Path, setup: Setup):
    shard = storage / "refscores" / setup.cache.name / "part-00000.parquet"
    return shard.exists


@pytest.mark.parametrize("stagger", ["together", "mid-write"])
def test_two_scores_write_one_cache_equal_to_a_single_run(setup, tmp_path, stagger):
    """mid-write: the second starts once the first has written its first shard (of 8)."""
    storage = setup.storage_with(tmp_path / "storage", "datasets")
    config = setup.config_file(storage)
    when = 0.0 if stagger == "together" else _first_shard_written(storage, setup)

    a, b = start_pair(tmp_path, ["score", "-c", config], ["score", "-c", config], when)
    out = storage / "refscores" / setup.cache.name
    for done in (a, b):
        assert done.returncode == 0, done.stderr
        assert_clean(done)
        assert done.output == str(out)
    statuses = sorted("done" if "score: done:" in d.stderr else "up to date" if "score: up to date:" in d.stderr
                      else "?" for d in (a, b))
    assert statuses == ["done", "up to date"], a.stderr + b.stderr
    if stagger == "mid-write":
        # a held the lock from before its first shard to its manifest: b cannot have written.
        assert "score: up to date:" in b.stderr, b.stderr
        if "waiting" in b.stderr:  # b came while a was still writing (else: after a finished)
            assert "being written by another process" in b.stderr and f"pid {a.pid}" in b.stderr, b.stderr
    assert [d.name for d in (storage / "refscores").iterdir()] == [out.name]
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    # Every file, the manifest included, is byte-identical to a single run's.
    assert file_bytes(out) == file_bytes(setup.cache)
    assert tmp_leftovers(storage) == []


def test_score_waits_for_the_holder_and_removes_dead_writers_leftovers(setup, tmp_path):
    """A cache left half-written (temp files, no complete manifest) by a writer that still holds
    the lock: `dpo score` waits and touches nothing; once the holder is killed with SIGKILL it
    takes the lock, removes the leftovers, resumes and ends with a single run's bytes."""
    storage = setup.storage_with(tmp_path / "storage", "datasets", "refscores")
    out = storage / "refscores" / setup.cache.name
    manifest = json.loads((out / "manifest.json").read_text())
    kept = manifest["shards"][:3]
    for shard in manifest["shards"][3:]:
        (out / shard["file"]).unlink()
    (out / "manifest.json").write_text(json.dumps({**manifest, "shards": kept, "complete": False}))
    leftovers = [out / ".tmp-part-00003.parquet.dead01", out / ".tmp-manifest.json.dead02"]
    leftovers[0].write_bytes(b"half a parquet file")
    leftovers[1].write_text('{"kind": "refscores", "compl')
    config = setup.config_file(storage)

    holder = Holder(lock_path(storage, "refscores", setup.cache.name))
    try:
        proc = Proc(tmp_path, "score", "score", "-c", config)
        wait_for(lambda: "waiting" in proc.stderr_so_far(), "score to wait for the lock", procs=[proc])
        message = proc.stderr_so_far()
        assert "being written by another process" in message and f"pid {holder.pid}" in message, message
        assert all(p.exists() for p in leftovers), "a waiting process removed another's files"
        assert sorted(p.name for p in out.glob("part-*.parquet")) == [s["file"] for s in kept]
    finally:
        holder.kill()
    done = proc.wait()
    assert done.returncode == 0, done.stderr
    assert_clean(done)
    assert "resuming, 3 of 8 shards already scored" in done.stderr
    assert tmp_leftovers(storage) == []
    assert file_bytes(out) == file_bytes(setup.cache)


def test_audit_report_waits_for_the_holder_of_its_lock(setup, tmp_path):
    """`dpo audit` writes its report under the report folder's lock: it waits for a holder
    (naming its pid) and writes once the holder is killed with SIGKILL."""
    storage = setup.storage_with(tmp_path / "storage", "datasets", "refscores")
    cache = storage / "refscores" / setup.cache.name
    reports = storage / "audits" / setup.cache.name
    reports.mkdir(parents=True)
    holder = Holder(reports / ".lock")
    try:
        proc = Proc(tmp_path, "audit", "audit", str(cache))
        wait_for(lambda: "waiting" in proc.stderr_so_far(), "audit to wait for the lock", procs=[proc])
        message = proc.stderr_so_far()
        assert "being written by another process" in message and f"pid {holder.pid}" in message, message
        assert not (reports / "quick.json").exists()
    finally:
        holder.kill()
    done = proc.wait()
    assert done.returncode == 0, done.stderr
    assert_clean(done)
    assert json.loads((reports / "quick.json").read_text())["passed"] is True
    assert (reports / "quick.html").is_file() and tmp_leftovers(storage) == []


# --- train: the second refuses at once, naming the holder's pid -----------------------------------


@pytest.mark.parametrize("stagger", [0.0, 0.5])
def test_two_trains_of_one_run_name_one_trains_the_other_refuses(setup, tmp_path, stagger):
    storage = setup.storage_with(tmp_path / "storage", "datasets", "refscores")
    config = setup.config_file(storage)
    a, b = start_pair(tmp_path, ["train", "-c", config], ["train", "-c", config, "--set", f"train.learning_rate={LR_B}"],
                      stagger)
    lrs = {"a": LR_A, "b": LR_B}
    assert sorted([a.returncode == 0, b.returncode == 0]) == [False, True], a.stderr + "\n----\n" + b.stderr
    winner, loser = (a, b) if a.returncode == 0 else (b, a)
    run_dir = storage / "runs" / "r"
    assert winner.output == str(run_dir)
    for done in (winner, loser):
        assert_clean(done)
    # The loser refused cleanly: one error line, naming the winner's pid (or "pid unknown" if it
    # asked in the instant between the winner's lock and the winner writing its pid).
    errors = [line for line in loser.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and loser.stderr.rstrip().endswith(errors[0]), loser.stderr
    assert "another process" in errors[0] and "pid" in errors[0], errors[0]
    assert f"pid {winner.pid} " in errors[0] or "pid unknown" in errors[0], errors[0]
    assert loser.stdout.strip() == ""

    # What is on disk is the winner's run alone, equal to that run trained alone.
    lr = lrs[winner.name]
    alone = setup.reference_run(lr)
    summary, expected = (json.loads((d / "run.json").read_text()) for d in (run_dir, alone))
    assert summary["inputs"]["train"]["learning_rate"] == lr
    # final/ byte for byte, but for the model card, which names the model folder and the run
    card = "final/README.md"
    assert summary["fingerprint"] == expected["fingerprint"]
    assert {k: v for k, v in summary["files"].items() if k != card} == {
        k: v for k, v in expected["files"].items() if k != card} and card in summary["files"]
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (alone / "final" / "model.safetensors").read_bytes()
    metrics = read_metrics(run_dir)
    assert without_timing(metrics) == without_timing(read_metrics(alone))
    assert {r["step"] for r in metrics if "loss" in r} == set(range(1, 7))  # 6 steps, each once
    assert f"learning_rate: {lr}" in (run_dir / "config.yaml").read_text()
    assert [p.name for p in (storage / "runs").iterdir()] == ["r"]
    assert tmp_leftovers(storage) == []


# --- leftovers of dead writers in train's and audit's outputs (in this process) -----------------------


def test_train_removes_dead_writers_leftovers(setup, tmp_path):
    """Temporary files a killed `dpo train` left in the run folder (an atomic write of config.yaml
    or run.json, a checkpoint being saved) are removed by the next run, which holds the lock."""
    storage = setup.storage_with(tmp_path / "storage", "datasets", "refscores")
    run_dir = storage / "runs" / "r"
    leftovers = [run_dir / ".tmp-config.yaml.dead01", run_dir / ".tmp-run.json.dead02",
                 run_dir / "checkpoints" / ".tmp-step-000004.dead03"]
    leftovers[2].mkdir(parents=True)
    (leftovers[2] / "optimizer.pt").write_bytes(b"half")
    for path in leftovers[:2]:
        path.write_text("half")
    result = train(config_from_dict(setup.raw(storage)), show_progress=False)
    assert not result.skipped
    assert tmp_leftovers(storage) == []
    alone = setup.reference_run(LR_A)
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (alone / "final" / "model.safetensors").read_bytes()


def test_audit_report_removes_dead_writers_leftovers(setup, tmp_path):
    from pipeline.audit.checks import audit
    from pipeline.audit.report import save_report

    storage = setup.storage_with(tmp_path / "storage", "datasets", "refscores")
    cache = storage / "refscores" / setup.cache.name
    reports = storage / "audits" / setup.cache.name
    reports.mkdir(parents=True)
    for name in (".tmp-quick.json.dead01", ".tmp-quick.html.dead02", ".tmp-full.json.dead03"):
        (reports / name).write_text("half")
    html = save_report(audit(cache))
    assert html == reports / "quick.html" and json.loads((reports / "quick.json").read_text())["passed"] is True
    assert tmp_leftovers(storage) == []


# --- storage that cannot be written: one line that names the path ----------------------------------


def _one_error_line(done: Done) -> str:
    assert done.returncode != 0 and done.stdout.strip() == ""
    assert_clean(done)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr
    return errors[0]


def test_storage_that_is_a_file_is_a_one_line_error(setup, tmp_path):
    storage = tmp_path / "storage"
    storage.write_text("not a folder\n")
    done = Proc(tmp_path, "prepare", "prepare", "-c", setup.config_file(storage)).wait()
    line = _one_error_line(done)
    assert str(storage) in line and "is a file" in line, line
    assert storage.read_text() == "not a folder\n"


def test_read_only_storage_is_a_one_line_error(setup, tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    storage.chmod(0o555)
    try:
        probe = storage / "probe"
        try:
            probe.touch()
            probe.unlink()
            writable = True
        except OSError:
            writable = False
        if writable or os.access(storage, os.W_OK):
            pytest.skip("this user can write into a chmod 0o555 folder (root): no read-only storage to test")
        done = Proc(tmp_path, "prepare", "prepare", "-c", setup.config_file(storage)).wait()
        line = _one_error_line(done)
        assert str(storage) in line and "writable" in line, line
        assert list(storage.iterdir()) == []
    finally:
        storage.chmod(0o755)
