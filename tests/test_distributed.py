"""Training on 2 processes (torchrun, gloo on the CPU) computes what one process computes.

The effective batch is per_device_train_batch_size x gradient_accumulation_steps x world size:
2 processes x 2 pairs and 1 process x 4 pairs train on the same pairs each step, so the losses
per step and the final weights must agree to float32 rounding (1e-5), under DDP and FSDP2.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flows import cli
from pipeline.config import config_from_dict
from pipeline.train import train

TRAIN = {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_steps": 4, "eval_steps": 2,
         "save_steps": 2, "save_total_limit": 3, "warmup_steps": 1, "lr_scheduler_type": "linear",
         "max_grad_norm": 0.5}
TOLERANCE = 1e-5


def _steps(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
    return cli.main(["train", "-c", config_path, "--nproc-per-node", "2", "--no-progress",
                     "--set", "train.per_device_train_batch_size=2", *extra])


LORA = {"learning_rate": 1e-2, "peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}


@pytest.mark.parametrize("engine,lora", [("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True)],
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


FAIL_HOOK = """
import os
if "LOCAL_RANK" in os.environ and os.environ.get("RANK") == os.environ.get("DPO_TEST_FAIL_RANK"):
    import pipeline.train as train_module

    real_step = train_module.train_step

    def failing_step(trainer, step):
        if step == int(os.environ["DPO_TEST_FAIL_STEP"]):
            raise RuntimeError(f"simulated failure of rank {trainer.world.rank} at step {step + 1}")
        return real_step(trainer, step)

    train_module.train_step = failing_step
if "LOCAL_RANK" in os.environ and os.environ.get("RANK") == os.environ.get("DPO_TEST_ABORT_AT_EXIT"):
    import atexit

    atexit.register(os.abort)  # SIGABRT as the process ends, after its work is done
"""


def fail_rank_at(tmp_path, monkeypatch, rank: int, step: int) -> None:
    """Make rank ``rank`` of the torchrun children this test starts fail at (0-based) ``step``:
    FAIL_HOOK as their sitecustomize; delenv DPO_TEST_FAIL_RANK to stop it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(FAIL_HOOK))
    monkeypatch.setenv("PYTHONPATH", f"{hook}:{':'.join(sys.path)}")
    monkeypatch.setenv("DPO_TEST_FAIL_RANK", str(rank))
    monkeypatch.setenv("DPO_TEST_FAIL_STEP", str(step))


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
    line = cli.run_progress(cfg, resumed_dir)
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
    assert cli.main(["train", "-c", config_path]) == 2  # a config error, saying what to run


def test_micro_batches_partition_the_global_batch():
    """Rank r's micro-batch a is run (a x world + r) of the global batch: every pair once."""
    from pipeline.distributed import World
    from pipeline.train import Trainer

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

    from pipeline.distributed import World, full_state, wrap

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
