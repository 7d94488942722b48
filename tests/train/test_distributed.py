"""Training on 2 processes (torchrun, gloo on the CPU) computes what one process computes.

The effective batch is per_device_train_batch_size x gradient_accumulation_steps x world size:
2 processes x 2 pairs and 1 process x 4 pairs train on the same pairs each step, so the losses
per step and the final weights must agree to float32 rounding (1e-5), under DDP and FSDP2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.config.load import config_from_dict
from pipeline.storage import paths
from pipeline.train.stage import train

from flows.cli import commands
from flows.cli.main import main as dpo_main

from tests.helpers import FAIL_HOOK, fail_rank_at

TRAIN = {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_steps": 4, "eval_steps": 2,
         "save_steps": 2, "save_total_limit": 3, "warmup_steps": 1, "lr_scheduler_type": "linear",
         "max_grad_norm": 0.5}
TOLERANCE = 1e-5


def _steps(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / paths.METRICS).read_text().splitlines()]


def _losses(run_dir) -> list[tuple]:
    """(step, train loss, gradient norm) per step, and the eval losses, in order."""
    return [(r["step"], r.get("loss", r.get("eval/loss")), r.get("grad_norm")) for r in _steps(run_dir)
            if "loss" in r or "eval/loss" in r]


def _assert_same_run(a, b, weights="model.safetensors") -> None:
    one, two = _losses(a), _losses(b)
    assert [r[0] for r in one] == [r[0] for r in two]
    for x, y in zip(one, two):
        assert x[1] == pytest.approx(y[1], abs=TOLERANCE), (x, y)
        if x[2] is not None:
            assert x[2] == pytest.approx(y[2], abs=TOLERANCE), (x, y)
    wa, wb = load_file(str(a / "final" / weights)), load_file(str(b / "final" / weights))
    assert set(wa) == set(wb)
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert worst < TOLERANCE, worst
    # and training did move them: the comparison is not between two copies of the start
    assert one[-1][1] != pytest.approx(one[0][1], abs=1e-3)


def _write(cfg, path):
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def _two_processes(config_path, *extra) -> int:
    return dpo_main(["train", "-c", config_path, "--nproc-per-node", "2", "--no-progress",
                     "--set", "train.per_device_train_batch_size=2", *extra])


LORA = {"learning_rate": 1e-2, "peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}


@pytest.mark.parametrize("engine,lora", [("ddp", False), ("fsdp", False),
                                         pytest.param("ddp", True, marks=pytest.mark.slow),  # fsdp-lora is the harder case
                                         ("fsdp", True)],
                         ids=["ddp", "fsdp", "ddp-lora", "fsdp-lora"])
def test_two_processes_train_as_one(prepared_demo, tmp_path, engine, lora):
    """Full fine-tuning and LoRA (frozen and trained parameters in the same FSDP2 units; the
    adapter saved whole) on 2 processes equal 1 process at the same effective batch."""
    cfg = prepared_demo({**TRAIN, **(LORA if lora else {}), "run_name": "one"})
    one = train(cfg, show_progress=False)
    assert one.summary["settings"]["world_size"] == 1
    config_path = _write(cfg, tmp_path / "two.yaml")
    assert _two_processes(config_path, "--set", f"train.distributed={engine}", "--set", "train.run_name=two") == 0
    two = tmp_path / "storage" / "runs" / "two"
    summary = json.loads((two / "run.json").read_text())
    assert summary["settings"] == {**one.summary["settings"], "world_size": 2, "distributed": engine}
    # the same computation: the same identity (effective batch 4), hence the same fingerprint
    assert summary["fingerprint"] == one.summary["fingerprint"]
    _assert_same_run(one.run_dir, two, weights="adapter_model.safetensors" if lora else "model.safetensors")
    assert summary["final_eval"]["eval/loss"] == pytest.approx(one.summary["final_eval"]["eval/loss"], abs=TOLERANCE)


@pytest.mark.parametrize("engine,resume_on", [("ddp", 1), ("fsdp", 2)])
def test_failed_rank_is_named_and_the_run_resumes(prepared_demo, tmp_path, monkeypatch, capsys, engine, resume_on):
    """Rank 1 fails at step 3 (after the step-2 checkpoint): the launcher names rank 1 and quotes
    its last lines; the run then resumes from that checkpoint, on one process (same effective
    batch) or again on two under FSDP2 (the full checkpoint sharded back), and ends where an
    uninterrupted run ends."""
    fail_rank_at(tmp_path, monkeypatch, rank=1, step=2)
    cfg = prepared_demo({**TRAIN, "run_name": "resumed"})
    config_path = _write(cfg, tmp_path / "run.yaml")
    assert _two_processes(config_path, "--set", f"train.distributed={engine}") == 1
    message = capsys.readouterr().err.split("error: ", 1)[1]
    assert message.startswith("rank 1 failed first")
    assert "simulated failure of rank 1 at step 3" in message
    resumed_dir = tmp_path / "storage" / "runs" / "resumed"
    assert not (resumed_dir / "run.json").exists()
    assert [p.name for p in (resumed_dir / "checkpoints").iterdir()] == ["step-000002"]
    state = json.loads((resumed_dir / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["world_size"] == 2
    # status: a stopped run, with the checkpoint to resume from
    line = commands.run_progress(cfg, resumed_dir)
    assert line.startswith("stopped: last logged step 2; resumable from step-000002"), line
    monkeypatch.delenv("DPO_TEST_FAIL_RANK")
    if resume_on == 1:  # one process, 4 pairs per step
        resumed_dir = train(cfg, resume=True, show_progress=False).run_dir
    else:
        assert _two_processes(config_path, "--set", f"train.distributed={engine}", "--resume") == 0
    straight = train(config_from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "run_name": "straight"}}),
                     show_progress=False)
    _assert_same_run(straight.run_dir, resumed_dir)


def test_world_size_must_match_the_config(prepared_demo, monkeypatch):
    cfg = prepared_demo({**TRAIN, "nproc_per_node": 2})
    with pytest.raises(Exception, match="this is one process: run `dpo train -c CONFIG`"):
        train(cfg, show_progress=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(Exception, match="torchrun started 4 processes but the config asks for 2"):
        train(cfg, show_progress=False)


def test_multi_node_is_launched_by_torchrun_on_each_node(prepared_demo, tmp_path):
    cfg = prepared_demo({**TRAIN, "nnodes": 2, "nproc_per_node": 2})
    config_path = _write(cfg, tmp_path / "run.yaml")
    assert dpo_main(["train", "-c", config_path]) == 2  # a config error, saying what to run


def test_micro_batches_partition_the_global_batch():
    """Rank r's micro-batch a is run (a x world + r) of the global batch: every pair once."""
    from pipeline.train.distributed import World
    from pipeline.train.stage import Trainer

    index = list(range(100, 124))  # 24 pairs = 3 per device x 2 accumulation x 4 ranks
    seen = []
    for rank in range(4):
        fake = Trainer.__new__(Trainer)
        fake.world, fake.micro = World(rank, 4, rank), 3
        for a in range(2):
            part = Trainer.micro_batch(fake, index, a)
            assert len(part) == 3
            seen += part
    assert sorted(seen) == index


def test_cpu_state_dict_is_independent_of_world_size(tmp_path):
    """A checkpoint's tensors are keyed by the policy's parameter names (not DDP's module. or
    the wrapper's model.), so a checkpoint written by any world size loads into any other."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.train.distributed import World, full_state, wrap

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    policy = LlamaForCausalLM(config)
    engine = wrap(policy, World(), "ddp", "float32")
    optimizer = torch.optim.AdamW(engine.parameters(), lr=1e-3)
    weights, optim = full_state(engine, optimizer, World())
    assert set(weights) == set(policy.state_dict())
    # optimizer entries by name under the wrapper (model.<name>), the same for every engine
    assert {name.removeprefix("model.") for name in optim["param_groups"][0]["params"]} == {
        name for name, _ in policy.named_parameters()}


def test_a_rank_crashing_as_it_ends_after_a_complete_run_is_reported_not_fatal(prepared_demo, tmp_path,
                                                                                monkeypatch, caplog):
    """Seen once in CI: a gloo rank aborted while exiting. When the run is complete and verifies
    (run.json, sha256 of final/), the launcher says so and reports the crash as a warning."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(FAIL_HOOK))
    monkeypatch.setenv("PYTHONPATH", f"{hook}:{':'.join(sys.path)}")
    monkeypatch.setenv("DPO_TEST_ABORT_AT_EXIT", "1")
    cfg = prepared_demo({**TRAIN, "run_name": "aborted"})
    config_path = _write(cfg, tmp_path / "run.yaml")
    with caplog.at_level("WARNING", logger="dpo"):
        assert _two_processes(config_path) == 0
    assert "the run is complete and verifies, but a process failed as it ended" in caplog.text
    assert json.loads((tmp_path / "storage" / "runs" / "aborted" / "run.json").read_text())["complete"]


DPO = str(Path(sys.executable).parent / "dpo")
TIMING = ("seconds", "tokens/s")
"""The only values of a run's files that differ between two runs of the same config."""


def _run_files(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of a finished run (final/, checkpoints/, run.json, config.yaml, the
    report), metrics.jsonl without its timings."""
    files = {}
    for path in sorted(run_dir.rglob("*")):
        name = str(path.relative_to(run_dir))
        if not path.is_file() or name in (paths.METRICS, "report.html"):
            continue
        files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    files[paths.METRICS] = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                             for line in (run_dir / paths.METRICS).read_text().splitlines()]
    return files


@pytest.mark.slow  # three 2-process runs and a kill -9: ~1.5 min on 2 cores; CI runs it in make test-slow
def test_sigkill_of_a_rank_mid_step_is_named_and_resume_ends_byte_identical(prepared_demo, tmp_path, monkeypatch,
                                                                           capfd):
    """`dpo train --nproc-per-node 2` (DDP, gloo): rank 1 killed with SIGKILL in the middle of
    step 3 (its forward done, rank 0 waiting on it in the gradient all-reduce), after the step-2
    checkpoint. The command ends at once (its peer is not left waiting on gloo) with an error
    naming rank 1 and SIGKILL and saying to rerun with --resume; `--resume` then ends with the
    bytes of an uninterrupted run: final/ and every checkpoint, run.json, the metrics but their
    timings."""
    cfg = prepared_demo({**TRAIN, "max_steps": 6, "run_name": "r"})  # a checkpoint after the resume too
    config_path = _write(cfg, tmp_path / "run.yaml")
    run_dir = tmp_path / "storage" / "runs" / "r"
    assert _two_processes(config_path) == 0  # the uninterrupted run, then set aside
    straight = tmp_path / "straight"
    shutil.move(run_dir, straight)
    capfd.readouterr()

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(FAIL_HOOK))
    paused = tmp_path / "paused.pid"
    env = {**os.environ, "PYTHONPATH": f"{hook}:{':'.join(sys.path)}", "DPO_TEST_PAUSE_RANK": "1",
           "DPO_TEST_PAUSE_STEP": "2", "DPO_TEST_PAUSE_FILE": str(paused)}
    command = [DPO, "train", "-c", config_path, "--nproc-per-node", "2", "--no-progress",
               "--set", "train.per_device_train_batch_size=2"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not paused.is_file() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)  # the pid written whole
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):  # torchrun's, and its ranks
            if "RANK" in child.environ():
                ranks[child.environ()["RANK"]] = child
        assert sorted(ranks) == ["0", "1"] and ranks["1"].pid == int(paused.read_text())
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
        killed_at = time.time()
        os.kill(ranks["1"].pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        took = time.time() - killed_at
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert took < 60, took  # torchrun stopped rank 0 (or gloo told it its peer is gone): no wait on gloo
    assert not ranks["0"].is_running()
    message = err.split("error: ", 1)[1]
    assert message.startswith(f"rank 1 was killed by SIGKILL (pid {ranks['1'].pid}) and left no error"), message
    # then rank 0: its broken gloo connection, or torchrun's SIGTERM if that came first
    assert "\nafterwards rank 0: RuntimeError" in message or "\nafterwards rank 0: stopped by torchrun" in message
    assert message.rstrip().endswith("run the same command again with --resume to continue from the last one")
    assert not (run_dir / "run.json").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]

    assert _two_processes(config_path, "--resume") == 0
    assert "train: resumed from step-000002 (step 2 of 6)" in capfd.readouterr().err
    resumed = _run_files(run_dir)
    assert resumed == _run_files(straight)
    # written after the resume: a checkpoint's weights (safetensors metadata in a fixed order) and
    # optimizer state (AdamW's betas a tuple again, as in the uninterrupted run)
    assert {"final/model.safetensors", "run.json", "checkpoints/step-000004/model.safetensors",
            "checkpoints/step-000004/optimizer.pt"} <= set(resumed)


def _rank_dir(log_dir: Path, rank: int, error: str | None = None, failed_at: float | None = None) -> str:
    folder = log_dir / "run-id" / "attempt_0" / str(rank)
    folder.mkdir(parents=True)
    (folder / "stderr.log").write_text(f"[rank{rank}]:Traceback ...\n[rank{rank}]:{error}\n" if error else "")
    if failed_at is not None:
        (folder / "failed_at").write_text(repr(failed_at))
        (folder / "error.json").write_text("{}")
    return str(folder)


def test_failure_report_names_the_rank_killed_from_outside(tmp_path):
    """Which rank is named: one that died of a signal torchrun did not send (what a kill -9 or
    the out-of-memory killer leaves: no error file), before the ranks whose errors came after
    (a broken connection) and the ranks torchrun stopped; a rank torchrun had to SIGKILL after
    its SIGTERM is not named; without such a rank, the earliest error file as before."""
    from pipeline.train.launch import RANK_EXITS, failure_report

    log_dir = tmp_path / "logs"
    exits = {
        "0": {"pid": 10, "exitcode": 1, "signal": None, "stopped_with": None, "error_written": True,
              "log": _rank_dir(log_dir, 0, "RuntimeError: Connection reset by peer", failed_at=2.0)},
        "1": {"pid": 11, "exitcode": -9, "signal": "SIGKILL", "stopped_with": None, "error_written": False,
              "log": None},
        "2": {"pid": 12, "exitcode": -15, "signal": "SIGTERM", "stopped_with": "SIGTERM", "error_written": False,
              "log": _rank_dir(log_dir, 2)},
        "3": {"pid": 13, "exitcode": -9, "signal": "SIGKILL", "stopped_with": "SIGKILL", "error_written": False,
              "log": _rank_dir(log_dir, 3)},
    }
    (log_dir / RANK_EXITS).write_text(json.dumps(exits))
    lines = failure_report(log_dir, 1, "").splitlines()
    assert lines[0].startswith("rank 1 was killed by SIGKILL (pid 11) and left no error (a signal from another "
                               "process, or from the kernel's out-of-memory killer: see `dmesg`); torchrun "
                               f"stopped the other ranks (exit 1); logs in {log_dir}")
    assert lines[1:] == ["afterwards rank 0: RuntimeError: Connection reset by peer",
                         "afterwards rank 2: stopped by torchrun (SIGTERM)",
                         "afterwards rank 3: stopped by torchrun (SIGKILL)"]
    # no rank killed from outside: the rank whose error file is the earliest
    del exits["1"]
    (log_dir / RANK_EXITS).write_text(json.dumps(exits))
    assert failure_report(log_dir, 1, "").startswith("rank 0 failed first (torchrun exit 1); its last lines")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_compiled_processes_with_token_micro_batches_train_as_one(prepared_demo, tmp_path, engine):
    """train.torch_compile and train.micro_batch_tokens under DDP and FSDP2 (2 gloo processes, each
    rank as many micro-batches as the other needs): the same run as 1 eager process with fixed
    micro-batches, losses and gradient norms within 1e-4, and the recompiles counted."""
    cfg = prepared_demo({**TRAIN, "run_name": "one"})
    one = train(cfg, show_progress=False)
    config_path = _write(cfg, tmp_path / "two.yaml")
    assert _two_processes(config_path, "--set", f"train.distributed={engine}", "--set", "train.run_name=two",
                          "--set", "train.torch_compile=true", "--set", "train.micro_batch_tokens=60") == 0
    two = tmp_path / "storage" / "runs" / "two"
    assert json.loads((two / "run.json").read_text())["fingerprint"] == one.summary["fingerprint"]
    for x, y in zip(_losses(one.run_dir), _losses(two), strict=True):
        assert x[0] == y[0] and x[1] == pytest.approx(y[1], abs=1e-4), (x, y)
        if x[2] is not None:
            assert x[2] == pytest.approx(y[2], abs=1e-4), (x, y)
    compiled = [r for r in _steps(two) if "grad_norm" in r]
    assert compiled and all(r["compile/graphs"] >= 1 and r["compile/recompiles"] <= 4 for r in compiled)
