"""Prefect orchestration: the full flow, skipping up-to-date stages, forcing, artifacts, serving."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline import STAGES
from pipeline.config.load import config_from_dict

import flows.dpo_flow as pipeline_flows

from tests.helpers import mtimes, task_runs_of

DPO = str(Path(sys.executable).parent / "dpo")
PREFECT = str(Path(sys.executable).parent / "prefect")
TRAIN = {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "max_steps": 20, "eval_steps": 10, "save_steps": 0, "run_name": "flow"}


def demo_config(tmp_path, demo_assets) -> dict:
    return config_from_dict({
        "storage": str(tmp_path / "storage"),
        "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.1},
        "model": {"path": str(demo_assets["model"])},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "train": TRAIN,
    }).to_dict()


def test_flow_end_to_end_skips_and_forces(prefect_harness, tmp_path, demo_assets, monkeypatch):
    from prefect.artifacts import Artifact

    config = demo_config(tmp_path, demo_assets)
    first = pipeline_flows.dpo_pipeline(config=config)
    assert first["ran"] == {"prepare": True, "score": True, "audit": True, "train": True}
    outputs = {k: Path(v) for k, v in first["outputs"].items()}
    run = json.loads((outputs["train"] / "run.json").read_text())
    assert run["complete"] and run["final_eval"]["eval/rewards/accuracies"] > 0.6
    for key in ("dpo-prepare", "dpo-score", "dpo-audit", "dpo-audit-stats", "dpo-train", "dpo-pipeline"):
        assert Artifact.get(key) is not None, key
    assert "kept" in Artifact.get("dpo-prepare").data

    # Second run: prepare and score must not execute at all.
    calls = []
    monkeypatch.setattr(pipeline_flows, "prepare", lambda *a, **k: calls.append("prepare"))
    monkeypatch.setattr(pipeline_flows, "run_score_child", lambda *a, **k: calls.append("score"))
    monkeypatch.setattr(pipeline_flows, "train", lambda *a, **k: calls.append("train"))
    before = {stage: mtimes(path) for stage, path in outputs.items()}
    state = pipeline_flows.dpo_pipeline(config=config, return_state=True)
    second = state.result()
    assert second["ran"] == {"prepare": False, "score": False, "audit": False, "train": False}
    assert calls == []
    # every skipped stage is a task run of its own, Completed as "Skipped", naming what it reused
    task_states = {run.name.rsplit("-", 1)[0]: run.state for run in task_runs_of(state)}
    assert set(task_states) == set(STAGES)
    for stage, task_state in task_states.items():
        assert task_state.is_completed() and task_state.name == "Skipped", (stage, task_state)
        assert str(outputs[stage]) in task_state.message
    assert {stage: mtimes(path) for stage, path in outputs.items()} == before
    monkeypatch.undo()

    # Forcing score reruns score and what consumes it (train), not prepare.
    score_calls = []
    real_child = pipeline_flows.run_score_child
    monkeypatch.setattr(pipeline_flows, "run_score_child", lambda c: score_calls.append(1) or real_child(c))
    forced = pipeline_flows.dpo_pipeline(config=config, force=["score"])
    assert forced["ran"] == {"prepare": False, "score": True, "audit": True, "train": True}
    assert score_calls == [1]
    assert mtimes(outputs["prepare"]) == before["prepare"]
    assert forced["outputs"] == first["outputs"]  # same inputs, same directories

    only = pipeline_flows.dpo_pipeline(config=config, stages=["score"])
    assert only["ran"] == {"score": False}


def test_the_flow_parameters_are_a_typed_form():
    """Prefect's parameter schema (the UI's form) has every config section and key, with types,
    choices, defaults and the descriptions written in pipeline/config/schema.py."""
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(pipeline_flows.dpo_pipeline.fn).model_dump_for_openapi()
    defs = schema["definitions"]
    config_ref = schema["properties"]["config"]
    assert config_ref.get("$ref", "").endswith("/ConfigParams") or "allOf" in config_ref
    config = defs["ConfigParams"]
    assert config["required"] == ["data", "model"]
    train = defs["TrainConfigParams"]["properties"]
    assert train["beta"]["default"] == 0.1 and train["beta"]["type"] == "number"
    loss_type = train["loss_type"]  # a name or a list of names
    choices = [option.get("enum") or option["items"]["enum"] for option in loss_type["anyOf"]]
    assert all("sigmoid" in c and "simpo" in c for c in choices) and loss_type["default"] == "sigmoid"
    assert "Hub" in defs["DataConfigParams"]["properties"]["path"]["description"]
    assert defs["DataConfigParams"]["required"] == ["path"]
    stages = schema["properties"]["stages"]["anyOf"][0]["items"]
    assert stages["enum"] == list(STAGES)


def test_flow_parameters_refuse_unknown_keys(prefect_harness, tmp_path, demo_assets):
    config = demo_config(tmp_path, demo_assets)
    config["train"] = {**config.get("train", {}), "no_such_key": 1}
    with pytest.raises(Exception, match="no_such_key"):
        pipeline_flows.dpo_pipeline(config=config)


def test_status_command(tmp_path, demo_assets):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(demo_config(tmp_path, demo_assets)))
    subprocess.run([DPO, "prepare", "-c", str(config), "--no-progress"], check=True, capture_output=True)
    out = subprocess.run([DPO, "status", "-c", str(config)], check=True, capture_output=True, text=True).stdout
    lines = {line.split()[0]: line.split()[1] for line in out.strip().splitlines()[:4]}
    assert lines == {"prepare": "complete", "score": "missing", "audit": "missing", "train": "missing"}
    free = subprocess.run([DPO, "status", "-c", str(config), "--set", "train.loss_type=simpo"], check=True,
                          capture_output=True, text=True).stdout
    lines = {line.split()[0]: " ".join(line.split()[1:3]) for line in free.strip().splitlines()[:4]}
    assert lines["score"] == lines["audit"] == "not needed" and lines["train"].startswith("missing")
    assert "simpo is reference-free" in free


def test_serve_without_a_server_says_what_to_do(tmp_path, demo_assets):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(demo_config(tmp_path, demo_assets)))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    done = subprocess.run([DPO, "serve", "-c", str(config), "--cron", "0 3 * * *"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert "prefect server start --host 127.0.0.1" in done.stderr and "PREFECT_API_URL" in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:
            pass
        time.sleep(1)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port of 127.0.0.1; yields the environment that talks to it."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, 180, "the server")
        yield env
    finally:
        _stop(server)


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _python(code: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


def _deployment_exists(env: dict, name: str) -> bool:
    return _python("from prefect.client.orchestration import get_client\n"
                   f"with get_client(sync_client=True) as c: c.read_deployment_by_name({name!r})", env).returncode == 0


def _serve_and_run(env: dict, serve: list[str], deployment: str) -> dict:
    """`dpo serve SERVE...` against the server until ``deployment`` exists, then a manual run of it
    to the end: {"crons", "parameters", "state"} of the deployment and the run."""
    served = subprocess.Popen([DPO, "serve", *serve], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    check = f"""
import json
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

with get_client(sync_client=True) as client:
    d = client.read_deployment_by_name({deployment!r})
run = run_deployment({deployment!r}, timeout=900)
print(json.dumps({{"crons": [s.schedule.cron for s in d.schedules], "parameters": d.parameters,
                  "state": run.state.type.value}}, default=str))
"""
    try:
        _wait(lambda: _deployment_exists(env, deployment), 180, "the deployment")
        done = _python(check, env, timeout=1200)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        _stop(served)


@pytest.mark.slow
def test_serve_against_a_real_server(prefect_server, tmp_path, demo_assets):
    """`dpo serve` with a cron schedule against a real server; the deployment exists with that
    schedule and a manual run of it completes."""
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(demo_config(tmp_path, demo_assets)))
    result = _serve_and_run(prefect_server, ["-c", str(config), "--cron", "0 3 * * *"], "dpo-pipeline/dpo-pipeline")
    assert result["crons"] == ["0 3 * * *"]
    assert result["state"] == "COMPLETED"
    assert (tmp_path / "storage" / "runs" / "flow" / "run.json").exists()


@pytest.mark.slow
def test_serve_a_sweep_against_a_real_server(prefect_server, tmp_path, demo_assets):
    """`dpo serve --sweep --grid ...`: the dpo-sweep deployment with that schedule, the config and
    the grid as its parameters; a manual run of it trains both points."""
    config = tmp_path / "grid.yaml"
    raw = demo_config(tmp_path, demo_assets)
    raw["train"].update(max_steps=3, eval_steps=0, run_name=None)
    config.write_text(json.dumps(raw))
    result = _serve_and_run(prefect_server, ["-c", str(config), "--cron", "0 5 * * *", "--sweep",
                                             "--grid", "train.beta=0.05,0.2"], "dpo-sweep/dpo-sweep")
    assert result["crons"] == ["0 5 * * *"] and result["state"] == "COMPLETED"
    assert result["parameters"]["grid"] == {"train.beta": [0.05, 0.2]} and result["parameters"]["name"] == "grid"
    runs = tmp_path / "storage" / "runs"
    assert all((runs / f"grid_beta-{b}" / "run.json").exists() for b in ("0.05", "0.2"))
    assert (tmp_path / "storage" / "sweeps" / "grid" / "report.html").exists()


@pytest.mark.slow
def test_serve_rounds_against_a_real_server(prefect_server, tmp_path, demo_assets):
    """`dpo serve --rounds`: the dpo-rounds deployment with that schedule, the config and the
    rounds' name as its parameters; a manual run of it trains the round and writes rounds.json."""
    config = tmp_path / "iterative.yaml"
    raw = demo_config(tmp_path, demo_assets)
    raw["train"].update(max_steps=3, eval_steps=0, run_name=None)
    raw.update(generate={"num_samples": 4, "max_new_tokens": 8}, judge={"function": "pipeline.models.assets:demo_reward"},
               rounds={"iterations": 1, "prompts_per_round": 16, "eval_prompts": 8})
    config.write_text(json.dumps(raw))
    result = _serve_and_run(prefect_server, ["-c", str(config), "--cron", "0 6 * * *", "--rounds"],
                            "dpo-rounds/dpo-rounds")
    assert result["crons"] == ["0 6 * * *"] and result["state"] == "COMPLETED"
    assert result["parameters"]["name"] == "iterative"
    rounds = json.loads((tmp_path / "storage" / "rounds" / "iterative" / "rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]] == [0, 1]
    assert (tmp_path / "storage" / "runs" / "iterative-round1" / "run.json").exists()


@pytest.mark.slow
def test_deploy_on_a_work_pool_and_a_worker_runs_it(prefect_server, tmp_path, demo_assets):
    """`dpo serve --work-pool` registers the deployment (Flow.deploy) and returns; a process
    worker polling that pool runs it to completion. A missing pool is a clear error."""
    env = prefect_server
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(demo_config(tmp_path, demo_assets)))
    serve = [DPO, "serve", "-c", str(config), "--cron", "0 4 * * *", "--name", "pooled", "--work-pool", "gpu-box"]
    missing = subprocess.run(serve, capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 1 and "prefect work-pool create --type process gpu-box" in missing.stderr
    subprocess.run([PREFECT, "work-pool", "create", "--type", "process", "gpu-box"], check=True,
                   capture_output=True, env=env, timeout=120)
    done = subprocess.run(serve, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "prefect worker start --pool gpu-box" in done.stderr
    check = """
import json
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

with get_client(sync_client=True) as client:
    d = client.read_deployment_by_name("dpo-pipeline/pooled")
run = run_deployment("dpo-pipeline/pooled", timeout=0)
print(json.dumps({"pool": d.work_pool_name, "crons": [s.schedule.cron for s in d.schedules],
                  "run": str(run.id), "params": sorted(d.parameters["config"])}))
"""
    created = _python(check, env, timeout=120)
    info = json.loads(created.stdout.strip().splitlines()[-1])
    assert info["pool"] == "gpu-box" and info["crons"] == ["0 4 * * *"]
    assert {"data", "model", "train", "storage"} <= set(info["params"])
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", "gpu-box", "--run-once"],
                            capture_output=True, text=True, env=env, timeout=900)
    state = _python("from prefect.client.orchestration import get_client\n"
                    f"with get_client(sync_client=True) as c: print(c.read_flow_run({info['run']!r}).state.type.value)",
                    env)
    assert state.stdout.strip() == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:]
    assert (tmp_path / "storage" / "runs" / "flow" / "run.json").exists()


def test_pipeline_modules_never_import_prefect():
    root = Path(__file__).resolve().parents[2] / "pipeline"
    for source in root.glob("*.py"):
        text = source.read_text()
        assert "import prefect" not in text and "from prefect" not in text, source.name
        # the CLI reaches Prefect only through flows/, lazily inside the commands that need it


def test_failing_audit_stops_the_flow_before_training(prefect_harness, tmp_path, demo_assets):
    config = demo_config(tmp_path, demo_assets)
    done = pipeline_flows.dpo_pipeline(config=config, stages=["prepare", "score"])
    cache = Path(done["outputs"]["score"])
    (cache / "stray.txt").write_text("not part of the cache")
    with pytest.raises(Exception, match="foreign file stray.txt"):
        pipeline_flows.dpo_pipeline(config=config)
    assert not (tmp_path / "storage" / "runs" / "flow").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` (a terminal for the command) is absent")
def test_run_in_a_terminal_shows_progress_bars_and_logs_progress(tmp_path, demo_assets):
    """`dpo run` in a terminal (a pseudo-terminal from `script`): tqdm bars for prepare, the score
    child (written to the terminal, not into the captured lines) and training, and still the
    progress log lines that go to the flow run's logs."""
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(demo_config(tmp_path, demo_assets)))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    # script's terminal has 0 columns, where tqdm draws nothing: give it a width
    command = "stty cols 160 rows 50; " + " ".join(shlex.quote(part) for part in [DPO, "run", "-c", str(config)])
    done = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True, env=env,
                          timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:]
    screen = done.stdout
    assert re.search(r"(?m)^prepare: [\d,]+ ?rows \[", screen)  # a tqdm counter (rows not counted ahead here)
    for bar in ("score (transformers)", "train"):
        assert re.search(r"(?m)^" + re.escape(bar) + r": +100%\|", screen), bar  # a finished tqdm bar
    # the progress lines for the flow run's logs, from the score child and the in-process stages
    assert re.search(r"score \(transformers\): [\d,]+/[\d,]+ rows \(100%\)", screen)
    assert re.search(r"train: [\d,]+/[\d,]+ steps \(100%\)", screen)


def test_run_command_stage_selection(prefect_harness, tmp_path, demo_assets, capsys):
    """`dpo run --only/--from`, in this process (`dpo run` as a process of its own, with its temporary
    Prefect server: the slow test_run_in_a_terminal_shows_progress_bars_and_logs_progress)."""
    from flows.cli.main import main

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(demo_config(tmp_path, demo_assets)))
    assert main(["run", "-c", str(config), "--only", "prepare", "--only", "score"]) == 0
    done = capsys.readouterr()
    out = Path(done.out.strip().splitlines()[-1])
    assert out.parent == tmp_path / "storage" / "refscores"  # the last selected stage's output
    assert "prepare: ran" in done.err and "score: ran" in done.err
    assert not (tmp_path / "storage" / "runs").exists()
    assert main(["run", "-c", str(config), "--from", "score", "--only", "score"]) == 0
    again = capsys.readouterr()
    assert "score: up to date" in again.err and "prepare:" not in again.err
    with pytest.raises(SystemExit) as bad:
        main(["run", "-c", str(config), "--only", "nope"])
    assert bad.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_flow_trains_on_two_processes_and_names_a_failed_rank(prefect_harness, tmp_path, demo_assets, monkeypatch):
    """train.nproc_per_node 2: the train task launches torchrun as a child; a rank's failure
    fails the task with that rank and its last lines; without it the run completes on 2 processes.
    (A reference-free loss: the flow scores nothing, and what is tested is the launch.)"""
    from tests.helpers import fail_rank_at

    config = demo_config(tmp_path, demo_assets)
    config["train"].update(nproc_per_node=2, per_device_train_batch_size=8, max_steps=4, eval_steps=2,
                           loss_type="simpo")
    fail_rank_at(tmp_path, monkeypatch, rank=0, step=1)
    with pytest.raises(Exception, match=r"rank 0 failed first(.|\n)*simulated failure of rank 0 at step 2"):
        pipeline_flows.dpo_pipeline(config=config)
    monkeypatch.delenv("DPO_TEST_FAIL_RANK")
    done = pipeline_flows.dpo_pipeline(config=config)
    assert done["ran"]["train"] is True
    run = json.loads((Path(done["outputs"]["train"]) / "run.json").read_text())
    assert run["settings"]["world_size"] == 2 and run["steps"] == 4


def test_a_refusal_is_not_retried(prefect_harness, tmp_path, demo_assets, monkeypatch):
    """score.device=cuda on a machine without one: the score child refuses; the task fails at
    once (its retries are for crashes), with the child's message."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: score.device=cuda is no refusal here")
    config = demo_config(tmp_path, demo_assets)
    config["score"]["device"] = "cuda"
    calls = []
    real_child = pipeline_flows.run_score_child
    monkeypatch.setattr(pipeline_flows, "run_score_child", lambda c: calls.append(1) or real_child(c))
    with pytest.raises(pipeline_flows.StageRefused, match="score.device=cuda but no CUDA GPU is visible"):
        pipeline_flows.dpo_pipeline(config=config, stages=["prepare", "score"])
    assert calls == [1]


def test_stage_logs_reach_the_prefect_run(prefect_harness, tmp_path, demo_assets):
    """The dpo loggers of in-process stages and the score child's lines are in the flow run's
    logs (what the Prefect UI shows), including each stage's closing progress line."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    config = demo_config(tmp_path, demo_assets)
    from prefect.logging.handlers import APILogHandler

    state = pipeline_flows.dpo_pipeline(config=config, return_state=True)
    assert state.is_completed()
    APILogHandler().flush()  # Prefect ships logs in batches, in the background: send what is queued
    deadline = time.time() + 30
    with get_client(sync_client=True) as client:
        while True:  # and wait for the server to have stored the last of them
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            text = "\n".join(log.message for log in logs)
            if "train: 20/20 steps (100%)" in text or time.time() > deadline:
                break
            time.sleep(0.5)
    assert "prepare: " in text and "rows (100%)" in text           # prepare's progress line
    assert "score: done:" in text and "tok/s on cpu" in text       # the score child's own summary
    assert "step-0 check:" in text and "train: 20/20 steps (100%)" in text


def test_flow_skips_score_and_audit_for_a_reference_free_loss(prefect_harness, tmp_path, demo_assets, capsys):
    """loss_type simpo reads no reference: the flow trains a dataset that was never scored, the score
    and audit tasks end Skipped with the reason (and `dpo run` prints it); nothing is scored."""
    from flows.cli.commands import print_flow_result

    config = demo_config(tmp_path, demo_assets)
    config["train"].update(loss_type="simpo", beta=1.0, max_steps=3, eval_steps=0)
    state = pipeline_flows.dpo_pipeline(config=config, return_state=True)
    result = state.result()
    reason = "loss_type simpo is reference-free, no reference cache needed"
    assert result["ran"] == {"prepare": True, "score": False, "audit": False, "train": True}
    assert result["not_needed"] == {"score": reason, "audit": reason}
    assert result["outputs"]["score"] is None and result["outputs"]["audit"] is None
    assert not (tmp_path / "storage" / "refscores").exists()
    assert json.loads((Path(result["outputs"]["train"]) / "run.json").read_text())["refscores_dir"] is None
    task_states = {run.name.rsplit("-", 1)[0]: run.state for run in task_runs_of(state)}
    for stage in ("score", "audit"):
        assert task_states[stage].is_completed() and task_states[stage].name == "Skipped"
        assert task_states[stage].message == f"{stage} skipped: {reason}"
    print_flow_result(result)
    assert f"score: skipped: {reason}" in capsys.readouterr().err
    # asked for alone, or forced, the score stage still scores nothing for this config
    assert pipeline_flows.dpo_pipeline(config=config, stages=["score"], force=["score"])["ran"] == {"score": False}
    assert not (tmp_path / "storage" / "refscores").exists()
