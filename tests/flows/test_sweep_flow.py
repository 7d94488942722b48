"""`dpo sweep`: score once, train many (issue 23).

A 2 x 2 sweep on the demo scores once and trains four normal runs whose fingerprints are those
of the same `dpo train` runs made by hand; its report has four rows; a rerun skips every point.
A failing point fails alone; a reference-free point does not wait for the cache; bad sweeps are
refused before anything runs, naming the key. Slow: kill -9 of the sweep, then a rerun, ends
with the runs of an uninterrupted sweep.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config.load import load_config
from pipeline.config.sweep import SweepConfig
from pipeline.errors import ConfigError

from flows.cli.main import main
from flows.sweep_plan import parse_grid, point_names, point_overrides

from tests.conftest import assert_plots_render
from tests.helpers import mtimes, task_runs_of

DPO = str(Path(sys.executable).parent / "dpo")
SCREENSHOT = Path(__file__).resolve().parents[2] / "bench" / "results" / "sweep_report.png"
TRAIN = {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "max_steps": 4, "eval_steps": 2,
         "save_steps": 2, "warmup_steps": 1}
GRID = {"train.beta": [0.05, 0.2], "train.loss_type": ["sigmoid", "ipo"]}


def write_config(path: Path, demo_assets, sweep: dict | None, train: dict | None = None) -> Path:
    raw = {"storage": str(path.parent / "storage"),
           "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.1},
           "model": {"path": str(demo_assets["model"])},
           "tokenize": {"max_length": 128, "max_prompt_length": 64},
           "train": {**TRAIN, **(train or {})}}
    if sweep is not None:
        raw["sweep"] = sweep
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def task_states(state) -> dict[str, object]:
    """{task run name: state}; the stages' runs are named <stage>-<suffix>, the points' train <point>."""
    return {run.name if run.name.startswith("train ") else run.name.rsplit("-", 1)[0]: run.state
            for run in task_runs_of(state)}


def most_at_once(runs) -> int:
    """The most task runs that were running at the same moment."""
    events = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs], key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


# --- the points -----------------------------------------------------------------------------------


def test_grid_points_are_the_product_then_the_listed_points_with_readable_names():
    grid = parse_grid(["train.beta=0.05,0.1", "train.loss_type=sigmoid,[sigmoid,sft]", "train.learning_rate=1e-6"])
    assert grid == {"train.beta": [0.05, 0.1], "train.loss_type": ["sigmoid", ["sigmoid", "sft"]],
                    "train.learning_rate": ["1e-6"]}  # YAML's text; the float key reads it as 1e-6
    spec = SweepConfig(grid=grid, points=[{"train.beta": 0.3, "tokenize.max_length": 256}])
    points = point_overrides(spec)
    assert len(points) == 2 * 2 * 1 + 1 and points[-1] == {"train.beta": 0.3, "tokenize.max_length": 256}
    assert points[1] == {"train.beta": 0.05, "train.loss_type": ["sigmoid", "sft"], "train.learning_rate": "1e-6"}
    names = point_names("hh", points)
    assert names[0] == "hh_beta-0.05_loss_type-sigmoid_learning_rate-1e-6"
    assert names[1] == "hh_beta-0.05_loss_type-sigmoid-sft_learning_rate-1e-6"  # '+' is no folder character
    assert names[-1] == "hh_beta-0.3_max_length-256"
    assert len(set(names)) == len(names)
    # two keys with the same last part keep their whole names; a name too long ends with a hash
    clash = point_names("s", [{"train.seed": 1, "audit.seed": 2}])
    assert clash == ["s_train.seed-1_audit.seed-2"]
    long = point_names("s", [{"train.loss_type": ["sigmoid"] * 30}])[0]
    assert len(long) <= 100 and re.fullmatch(r"s_loss_type-sigmoid.*_[0-9a-f]{8}", long)


@pytest.mark.parametrize("args, message", [
    (["--grid", "train.betaa=0.1,0.2"], "unknown key train.betaa"),
    (["--grid", "train.beta="], "sweep.grid: train.beta has no values"),
    (["--grid", "train.beta=high,low"], "train.beta: expected a number, got 'high'"),
    (["--grid", "train.logging_steps=1,5"], "changing train.logging_steps does not change what a run trains"),
    (["--grid", "train.run_name=a,b"], "train.run_name cannot be swept"),
    (["--grid", "sweep.metric=loss"], "sweep.metric cannot be swept"),
    (["--grid", "train.beta"], "--grid 'train.beta': expected KEY=V1,V2"),
    ([], "nothing to sweep"),
    (["--set", "sweep.metric=perplexity", "--grid", "train.beta=0.1"], "sweep.metric: 'perplexity' is not an eval metric"),
    (["--set", "sweep.grid={train.beta: 0.1}"], "sweep.grid.train.beta: expected a list, got 0.1"),
    (["--set", "sweep.points=[{train.beta: 0.1}, {train.beta: 0.1}]"], "would be the same run"),
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, demo_assets, capsys, args, message):
    config = write_config(tmp_path / "run.yaml", demo_assets, None)
    assert main(["sweep", "-c", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "storage").exists()  # nothing prepared, scored or written


def test_a_run_folder_of_another_configuration_is_refused(tmp_path, demo_assets):
    from flows.sweep_plan import plan_sweep

    config = write_config(tmp_path / "run.yaml", demo_assets, {"grid": {"train.beta": [0.1]}})
    cfg = load_config(config)
    point = plan_sweep(cfg, None, "run").points[0]
    point.run_dir.mkdir(parents=True)
    (point.run_dir / "run.json").write_text(json.dumps({"complete": True, "files": {}, "fingerprint": "0" * 64}))
    with pytest.raises(ConfigError, match="holds a finished run of another configuration: name the sweep"):
        plan_sweep(cfg, None, "run")


def test_points_are_pinned_to_their_own_gpus(tmp_path, demo_assets, monkeypatch):
    """One point per visible GPU by default (train.nproc_per_node GPUs each), a CPU point's
    threads shared out; more points at once than GPUs allow is refused."""
    import torch

    from flows.sweep_flow import child_env, device_slots
    from flows.sweep_plan import plan_sweep

    config = write_config(tmp_path / "run.yaml", demo_assets, {"grid": {"train.beta": [0.1, 0.2, 0.3]}})
    assert device_slots(plan_sweep(load_config(config), None, "run")) == [None]  # this CPU: one at a time
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_slots(plan_sweep(load_config(config), None, "run")) == ["0", "1", "2", "3"]
    two = plan_sweep(load_config(config, ["train.nproc_per_node=2"]), None, "run")
    assert device_slots(two) == ["0,1", "2,3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert device_slots(two) == ["4,5", "6,7"]
    with pytest.raises(ConfigError, match=r"sweep.max_parallel=3 x 2 GPU\(s\) per point needs 6 GPUs, 4 are visible"):
        device_slots(plan_sweep(load_config(config, ["train.nproc_per_node=2", "sweep.max_parallel=3"]), None, "run"))
    env = child_env("6,7", 2)
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7" and env["DPO_DIE_WITH_PARENT"] == str(os.getpid())
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert child_env(None, 2)["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))


def test_device_slots_lend_each_set_to_one_point_at_a_time():
    """Six points on two GPU sets, from six threads (as the task runner's): never two points on
    one set, never more than two at once, and every set back when they are done, even after a failure."""
    import threading

    from flows.sweep_flow import DeviceSlots

    slots, holders, most, lock = DeviceSlots(["0", "1"]), {}, [0], threading.Lock()

    def point(i: int) -> None:
        with slots.taken() as devices:
            with lock:
                assert devices not in holders.values()
                holders[i] = devices
                most[0] = max(most[0], len(holders))
            time.sleep(0.02)
            with lock:
                del holders[i]
            if i == 3:
                raise RuntimeError("a failed point gives its GPUs back")

    threads = [threading.Thread(target=lambda i=i: _swallow(point, i)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert slots.count == 2 and most[0] == 2 and not holders
    with slots.taken() as first, slots.taken() as second:
        assert {first, second} == {"0", "1"}


def _swallow(function, *args) -> None:
    try:
        function(*args)
    except RuntimeError:
        pass


CHILD = """
import sys, time
from pipeline.train.launch import die_with_parent
die_with_parent()
print("alive", flush=True)
time.sleep(60)
"""
PARENT = f"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], env={{**os.environ, "DPO_DIE_WITH_PARENT": str(os.getpid())}})
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_point_s_training_dies_with_the_sweep_that_started_it():
    """DPO_DIE_WITH_PARENT: the child is killed when its parent is (SIGKILL, which the parent
    cannot pass on), and a child whose parent is already gone ends at once."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(1.5)  # the child has set its death signal
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in _state(child)  # gone (or a zombie awaiting init)
    orphan = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, "DPO_DIE_WITH_PARENT": "1"},
                            capture_output=True, text=True, timeout=60)
    assert orphan.returncode == 1 and "alive" not in orphan.stdout


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


# --- a 2 x 2 sweep on the demo -------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(prefect_harness, tmp_path_factory, demo_assets):
    """The 2 x 2 sweep on the demo, run once for the module, two points at a time: (config file,
    the flow's state)."""
    from flows.sweep_flow import dpo_sweep

    config = write_config(tmp_path_factory.mktemp("sweep") / "grid.yaml", demo_assets,
                          {"grid": GRID, "max_parallel": 2}, {"save_steps": 0})
    state = dpo_sweep(config=load_config(config).to_dict(), name="grid", return_state=True)
    return config, state


def test_a_2x2_sweep_scores_once_and_trains_four_runs(swept):
    config, state = swept
    result = state.result()
    storage = Path(load_config(config).storage)
    tasks = task_states(state)
    assert sorted(n for n in tasks if n.startswith("train ")) == sorted(f"train {r['point']}" for r in result["rows"])
    assert len(result["rows"]) == 4 and result["failed"] == {}
    for stage in ("prepare", "score", "audit"):  # once each, and they ran
        assert [n for n in tasks if n == stage] == [stage] and tasks[stage].name == "Completed", stage
    assert len(list((storage / "refscores").iterdir())) == 1
    runs = {r["point"]: json.loads((storage / "runs" / r["point"] / "run.json").read_text()) for r in result["rows"]}
    assert len({run["fingerprint"] for run in runs.values()}) == 4
    assert {run["refscores_dir"] for run in runs.values()} == {str(next((storage / "refscores").iterdir()))}
    for row in result["rows"]:
        assert row["state"] == "finished" and row["steps"] == TRAIN["max_steps"] and row["wall time (s)"] > 0


def test_the_sweeps_runs_are_the_hand_made_train_runs(swept):
    """Each point's fingerprint and result are those of `dpo train` with its overrides, by hand."""
    from pipeline.train.stage import train

    config, state = swept
    for row in state.result()["rows"]:
        sets = [f"train.beta={row['train.beta']}", f"train.loss_type={row['train.loss_type']}"]
        by_hand = train(load_config(config, [*sets, f"train.run_name=hand-{row['point']}"]))
        run = json.loads((Path(load_config(config).storage) / "runs" / row["point"] / "run.json").read_text())
        assert by_hand.summary["fingerprint"] == run["fingerprint"]
        assert by_hand.summary["final_eval"]["eval/loss"] == pytest.approx(run["final_eval"]["eval/loss"], rel=1e-4)


def test_the_report_and_artifact_have_a_row_per_point(swept):
    from prefect.artifacts import Artifact

    config, state = swept
    result = state.result()
    page = Path(result["report"])
    assert page == Path(load_config(config).storage) / "sweeps" / "grid" / "report.html"
    text = page.read_text()
    assert text.count("<tr") == 1 + 4 and text.count("data:image/png;base64,") == 3
    accuracies = [r["reward accuracy"] for r in result["rows"]]
    assert accuracies == sorted(accuracies, reverse=True)  # sweep.metric's default, best first
    artifact = json.loads(Artifact.get("dpo-sweep").data)
    assert [row["point"] for row in artifact] == [r["point"] for r in result["rows"]]


@pytest.mark.slow  # a headless browser: CI runs it in make test-slow, once chromium is installed
def test_the_demo_sweeps_report_renders_in_chromium(swept, tmp_path):
    """The 2 x 2 demo sweep's report.html loads and its plots render; the screenshot is kept in
    bench/results/ (a CI artifact), as the audit report's is."""
    page = Path(swept[1].result()["report"])
    assert_plots_render(page, tmp_path, height=1600, keep=SCREENSHOT)
    assert SCREENSHOT.stat().st_size > 10_000


def test_a_rerun_skips_every_point_and_status_lists_them(swept, capsys):
    from flows.sweep_flow import dpo_sweep

    config, first = swept
    storage = Path(load_config(config).storage)
    before = mtimes(storage / "runs"), mtimes(storage / "refscores")
    state = dpo_sweep(config=load_config(config).to_dict(), name="grid", return_state=True)
    assert state.is_completed()
    tasks = task_states(state)
    points = [n for n in tasks if n.startswith("train ")]
    assert len(points) == 4
    for name in [*points, "prepare", "score", "audit"]:
        assert tasks[name].is_completed() and tasks[name].name == "Skipped", name
    assert (mtimes(storage / "runs"), mtimes(storage / "refscores")) == before
    assert main(["status", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "sweep grid: 4 of 4 points finished" in out
    assert all(re.search(rf"{re.escape(r['point'])}\s+finished", out) for r in first.result()["rows"])


# --- failures, reference-free points -------------------------------------------------------------


def test_a_failing_point_fails_alone_and_reference_free_points_do_not_wait(prefect_harness, tmp_path, demo_assets,
                                                                         capsys):
    """A point whose training diverges (learning rate 1e9: non-finite gradients) fails its task run
    only; the flow ends Failed naming it; the reference-free point started before the cache was
    scored; two points trained at once (sweep.max_parallel: 2), never three; `dpo status` says
    which point failed and why."""
    from pipeline.errors import SweepFailed

    from flows.sweep_flow import dpo_sweep

    sweep = {"name": "mixed", "max_parallel": 2, "points": [{"train.beta": 1.0, "train.loss_type": "simpo"},
                                                            {"train.learning_rate": 1e9}, {"train.beta": 0.1}]}
    config = write_config(tmp_path / "mixed.yaml", demo_assets, sweep)
    state = dpo_sweep(config=load_config(config).to_dict(), return_state=True)
    assert state.is_failed()
    with pytest.raises(SweepFailed, match=r"1 of 3 points failed: mixed_learning_rate-1000000000.0 \(.*non-finite"):
        state.result()
    tasks = {run.name: run for run in task_runs_of(state)}
    points = {name.removeprefix("train "): run.state for name, run in tasks.items() if name.startswith("train ")}
    assert {name: s.type.value for name, s in points.items()} == {
        "mixed_beta-1.0_loss_type-simpo": "COMPLETED", "mixed_learning_rate-1000000000.0": "FAILED",
        "mixed_beta-0.1": "COMPLETED"}
    score = next(run for name, run in tasks.items() if name.startswith("score-"))
    assert tasks["train mixed_beta-1.0_loss_type-simpo"].start_time < score.end_time
    assert most_at_once([run for name, run in tasks.items() if name.startswith("train ")]) == 2  # max_parallel
    runs = Path(load_config(config).storage) / "runs"
    assert json.loads((runs / "mixed_beta-0.1" / "run.json").read_text())["complete"]
    assert main(["status", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "sweep mixed: 2 of 3 points finished" in out
    assert re.search(r"mixed_learning_rate-1000000000.0\s+failed", out) and "refused: non-finite" in out


# --- kill -9 ------------------------------------------------------------------------------------


def _final_bytes(storage: Path) -> dict[str, bytes]:
    return {p.parent.parent.name: p.read_bytes() for p in sorted((storage / "runs").glob("*/final/*.safetensors"))}


@pytest.mark.slow  # three sweeps of two 12-step points in `dpo` processes: ~3 min on 2 cores
def test_kill_9_of_a_sweep_then_a_rerun_ends_with_the_runs_of_an_uninterrupted_sweep(tmp_path, demo_assets):
    sweep, train = {"grid": {"train.beta": [0.05, 0.2]}}, {"max_steps": 12, "eval_steps": 4, "save_steps": 2}
    whole = write_config(tmp_path / "whole" / "s.yaml", demo_assets, sweep, train)
    killed = write_config(tmp_path / "killed" / "s.yaml", demo_assets, sweep, train)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    subprocess.run([DPO, "sweep", "-c", str(whole), "--no-progress"], check=True, env=env, timeout=900,
                   capture_output=True)
    second = tmp_path / "killed" / "storage" / "runs" / "s_beta-0.2"
    sweep_process = subprocess.Popen([DPO, "sweep", "-c", str(killed), "--no-progress"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _kill_9_of_a_sweep(sweep_process, second, killed, env, tmp_path)
    finally:  # what the sweep left: the temporary Prefect server it started (Prefect's own child)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep_process.pid, signal.SIGKILL)


def _kill_9_of_a_sweep(sweep_process, second: Path, killed: Path, env: dict, tmp_path: Path) -> None:
    deadline = time.monotonic() + 600
    while not list(second.glob("checkpoints/step-*")) and time.monotonic() < deadline:  # the 2nd point is under way
        time.sleep(0.2)
    assert sweep_process.poll() is None, "the sweep ended before the second point saved a checkpoint"
    os.kill(sweep_process.pid, signal.SIGKILL)  # the sweep process alone: its children must die with it
    sweep_process.wait()
    status = subprocess.run([DPO, "status", "-c", str(killed)], capture_output=True, text=True, env=env, timeout=120)
    assert re.search(r"s_beta-0.2\s+running", status.stdout) is not None  # what the killed flow last recorded
    time.sleep(2)  # the training child got SIGKILL with its parent: its run is stopped, not running
    status = subprocess.run([DPO, "status", "-c", str(killed)], capture_output=True, text=True, env=env, timeout=120)
    assert "stopped: last logged step" in status.stdout, status.stdout
    finished_first = mtimes(tmp_path / "killed" / "storage" / "runs" / "s_beta-0.05")
    done = subprocess.run([DPO, "sweep", "-c", str(killed), "--no-progress"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "s_beta-0.05: up to date" in done.stderr, done.stderr[-6000:]
    assert "resum" in done.stderr.lower(), done.stderr[-6000:]
    assert mtimes(tmp_path / "killed" / "storage" / "runs" / "s_beta-0.05") == finished_first
    fingerprints = [{p.parent.name: json.loads(p.read_text())["fingerprint"]
                     for p in (root / "storage" / "runs").glob("*/run.json")} for root in (tmp_path / "whole", tmp_path / "killed")]
    assert fingerprints[0] == fingerprints[1] and len(fingerprints[0]) == 2
    assert _final_bytes(tmp_path / "killed" / "storage") == _final_bytes(tmp_path / "whole" / "storage")
