"""The Prefect flow `dpo-pipeline`: one task per stage (prepare, score, audit, train), in order.

    from flows.dpo_flow import dpo_pipeline
    dpo_pipeline(config=cfg.to_dict())                       # prepare -> score -> audit -> train
    dpo_pipeline(config=..., stages=["score"], force=["score"])   # one stage alone

The tasks only wrap `pipeline/` functions (which never import Prefect). A stage is skipped when
its content-addressed output is complete and its files still match their manifest (for the
audit: a passed full audit of exactly the shards on disk now), decided before its task runs:
the stage's task run still appears, in a Completed state named "Skipped" whose message names
the directory it reused (and the flow logs "up to date" with it). ``force`` reruns a stage from scratch, and every
stage after it, since they consume its output. The score stage runs in a child process, so a
GPU's memory (vLLM keeps it until its process ends) is free again before training, and retries
cheaply: it resumes from its finished shards.
"""

# No `from __future__ import annotations` here: Prefect builds the parameter model from the flow's
# annotations, and a deployment loads this file outside its package, where strings do not resolve.
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from pipeline import STAGES
from pipeline.audit.checks import audit
from pipeline.audit.report import save_report
from pipeline.config.load import config_from_dict
from pipeline.config.schema import world_size
from pipeline.errors import AuditFailed, StageRefused
from pipeline.prepare.stage import prepare
from pipeline.storage import paths, trust
from pipeline.store import exclusive, lock_path
from pipeline.train.launch import launch_log_dir, run_streaming, train_argv
from pipeline.train.stage import TrainResult, launch, train

from flows.params import PipelineConfig, Stage, config_dict
from flows.plan import plan, stage_complete  # noqa: F401  (plan: part of this module's API)


def api_url() -> str | None:
    """The Prefect server this process talks to; None means only the ephemeral API."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _remove_output(stage: str, directory: Path) -> None:
    """--force: delete a stage's output, holding its writer lock (never under a running writer)."""
    if stage == "audit":
        for suffix in (".json", ".html"):
            path = paths.audit_report_path(paths.storage_of(directory), directory.name, "full", suffix)
            path.unlink(missing_ok=True)
        return
    if directory.exists():
        storage, kind = paths.storage_of(directory), directory.parent.name
        with exclusive(lock_path(storage, kind, directory.name), f"{stage} output {directory}", wait=True):
            shutil.rmtree(directory)


# --- tasks: thin wrappers around pipeline/ --------------------------------------------------------


def progress_bars() -> bool:
    """Terminal progress bars for the stages: only when `dpo run` / `dpo demo` started this flow in
    a terminal (they set DPO_PROGRESS_BARS=1, and DPO_PROGRESS_LOG=1 so that the log lines for the
    flow run's logs are written too); never for a deployment's or a worker's runs."""
    return os.environ.get("DPO_PROGRESS_BARS") == "1"


def skipped(stage: str, directory: str) -> State:
    """The final state of a stage's task when its output is already complete: Completed, named
    Skipped, the reused directory in its message and its result."""
    get_run_logger().info("%s: up to date, reusing %s", stage, directory)
    return Completed(name="Skipped", message=f"up to date: reused {directory}",
                     data={"output_dir": directory, "skipped": True})


def not_needed(stage: str, reason: str) -> State:
    """The final state of a stage the config does not need (score and audit for a reference-free
    loss): Completed, named Skipped, the reason in its message and the log; no output."""
    message = f"{stage} skipped: {reason}"
    get_run_logger().info("%s", message)
    return Completed(name="Skipped", message=message, data={"output_dir": None, "skipped": True})


def unneeded_reason(cfg) -> str | None:
    """Why the score and audit stages are not needed for this config (None: they are)."""
    if cfg.train.needs_reference():
        return None
    return f"loss_type {'+'.join(cfg.train.loss_names())} is reference-free, no reference cache needed"


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(config: dict, reuse: str | None = None) -> dict:
    if reuse:
        return skipped("prepare", reuse)
    with stage_logs():
        result = prepare(config_from_dict(config), show_progress=progress_bars())
    counts = result.manifest["counts"]
    rows = [{"outcome": "kept", "reason": "", "rows": counts["kept"]}] + [
        {"outcome": "rejected", "reason": reason, "rows": n}
        for reason, n in counts["rejected_by_reason"].items()
    ]
    create_table_artifact(rows, key="dpo-prepare", description=f"rows kept and rejected: {result.output_dir}")
    return {"output_dir": str(result.output_dir), "counts": counts}


def retry_unless_refused(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry what a retry can fix (a child killed, out of memory,
    a crash), never a refusal."""
    return not isinstance(state.data, StageRefused)


def child_failure(what: str, returncode: int, stderr: str) -> Exception:
    if "error: " in stderr and returncode in (1, 2):  # the dpo command's report of a user error
        return StageRefused(f"{what} refused: {stderr[stderr.rindex('error: ') + 7:].strip()}")
    return RuntimeError(f"{what} failed (exit {returncode}):\n{stderr[-4000:]}")


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """This task run's Prefect logger; the `dpo` logger outside a run."""
    try:
        return get_run_logger()
    except Exception:  # MissingContextError: called outside a flow or task run
        return logging.getLogger("dpo")


@contextlib.contextmanager
def stage_logs():
    """While a stage runs in this process: the `dpo` loggers' records go to the task run's
    Prefect logger (the run's logs in the UI, and the terminal under `dpo run`), not twice."""
    target = _run_logger()
    if not isinstance(target, logging.LoggerAdapter):
        yield
        return

    class ToRunLogger(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            target.log(record.levelno, self.format(record))

    dpo = logging.getLogger("dpo")
    handler, propagate, level = ToRunLogger(), dpo.propagate, dpo.level
    dpo.addHandler(handler)
    dpo.propagate = False
    dpo.setLevel(logging.INFO)
    try:
        yield
    finally:
        dpo.removeHandler(handler)
        dpo.propagate, dpo.level = propagate, level


def run_score_child(config: dict) -> tuple[str, dict]:
    """`dpo score` in a child process, its output lines into this run's log as they come;
    returns (output dir, run stats)."""
    logger = _run_logger()
    with tempfile.TemporaryDirectory() as tmp:
        config_path, stats_path = Path(tmp) / "config.yaml", Path(tmp) / "stats.json"
        config_path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "flows.cli", "score", "-c", str(config_path), "--stats-json", str(stats_path)]
        env = None
        if progress_bars():  # the child's bar to the terminal, its lines (captured) to the run's logs
            env = {**os.environ, "DPO_PROGRESS_TTY": "1", "DPO_PROGRESS_LOG": "1"}
        else:
            command.append("--no-progress")
        returncode, tail = run_streaming(command, lambda line: logger.info("%s", line), env=env)
        if returncode != 0:
            raise child_failure("dpo score", returncode, tail)
        stats = json.loads(stats_path.read_text())
    return stats.pop("output_dir"), stats


@task(name="score", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_refused, cache_policy=NO_CACHE)
def score_task(config: dict, reuse: str | None = None, skip: str | None = None) -> dict:
    if skip:
        return not_needed("score", skip)
    if reuse:
        return skipped("score", reuse)
    logger = get_run_logger()
    output_dir, stats = run_score_child(config)
    manifest = trust.verified_refscores(output_dir)
    logger.info("score: %s (%s rows, %s)", output_dir, manifest["rows"], stats.get("backend"))
    create_table_artifact(
        [{
            "backend": manifest["inputs"]["backend"],
            "dtype": manifest["inputs"]["dtype"],
            "rows": manifest["rows"],
            "response tokens": manifest["tokens"]["chosen"] + manifest["tokens"]["rejected"],
            "tokens scored this run": stats.get("sequence_tokens", 0),
            "tokens/s": round(stats.get("tokens_per_s", 0.0), 1),
            "seconds": round(stats.get("seconds", 0.0), 2),
        }],
        key="dpo-score",
        description=f"reference scores: {output_dir}",
    )
    return {"output_dir": output_dir, "stats": stats}


@task(name="audit", cache_policy=NO_CACHE)
def audit_task(config: dict, cache_dir: str, reuse: str | None = None, skip: str | None = None) -> dict:
    """Integrity and statistics always, a re-score sample of audit.rescore_rows rows."""
    if skip:
        return not_needed("audit", skip)
    if reuse:
        return skipped("audit", reuse)
    cfg = config_from_dict(config)
    with stage_logs():
        report = audit(cache_dir, cfg, rescore_rows=cfg.audit.rescore_rows, seed=cfg.audit.seed,
                       tolerance=cfg.audit.tolerance)
    html_path = save_report(report)
    lines = [f"# Audit of `{cache_dir}`", "", f"**{'passed' if report.passed else 'FAILED'}**", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {f.check} | {'ok' if f.ok else 'FAIL'} | {f.message} |" for f in report.findings]
    lines += ["", f"HTML report: `{html_path}`"]
    create_markdown_artifact("\n".join(lines), key="dpo-audit", description="reference cache audit")
    if report.stats:
        st = report.stats
        create_table_artifact(
            [{"quantity": name, **{k: round(v, 4) for k, v in d.items() if k != "count"}}
             for name, d in (("token log-prob", st.get("token_logp", {})), ("margin", st["margin"]),
                             ("chosen log-prob", st["sequence_logp"]["chosen"]))],
            key="dpo-audit-stats", description="reference score statistics",
        )
    if not report.passed:
        failed = "; ".join(f.message for f in report.findings if not f.ok)
        raise AuditFailed(f"audit of {cache_dir} failed: {failed}. Report: {html_path}")
    return {"output_dir": cache_dir, "passed": report.passed}


def run_train_child(config: dict) -> TrainResult:
    """`dpo train --resume` as train.nproc_per_node processes under torchrun, in a child process;
    a failure names the rank that failed first, with its last lines."""
    cfg = config_from_dict(config)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        argv = train_argv(config_path, resume=True, no_progress=True)
        logger = _run_logger()
        return launch(cfg, argv, launch_log_dir(cfg.storage), echo=False,
                      lines=lambda line: logger.info("%s", line))


@task(name="train", cache_policy=NO_CACHE)
def train_task(config: dict, reuse: str | None = None) -> dict:
    if reuse:
        return skipped("train", reuse)
    cfg = config_from_dict(config)
    if world_size(cfg.train) > 1:  # torchrun: DDP / FSDP2 processes
        result = run_train_child(config)
    else:
        with stage_logs():
            result = train(cfg, resume=True, show_progress=progress_bars())
    summary = result.summary
    rows = []
    for name in ("first_eval", "final_eval"):
        if summary.get(name):
            rows.append({"when": name, **{k.replace("eval/", ""): round(v, 5) for k, v in summary[name].items()}})
    create_table_artifact(rows, key="dpo-train", description=f"eval metrics: {result.run_dir}")
    return {"output_dir": str(result.run_dir), "summary": summary}


TASKS = {"prepare": prepare_task, "score": score_task, "audit": audit_task, "train": train_task}


# --- flows ---------------------------------------------------------------------------------------


def run_stage(cfg, stage: str, directory: Path, forced: bool = False) -> tuple[str | None, bool]:
    """Run one stage's task for ``cfg`` into ``directory`` (plan's): skipped when its output is up
    to date or the config does not need it, from scratch when ``forced``. Returns (its output,
    whether it ran); a failed task raises (a failed audit stops what comes after it)."""
    config = cfg.to_dict()
    args = (config, str(directory)) if stage == "audit" else (config,)
    unneeded = unneeded_reason(cfg)
    if unneeded and stage in ("score", "audit"):  # a reference-free loss: no cache to make or check
        return TASKS[stage](*args, skip=unneeded, return_state=True).result()["output_dir"], False
    reuse = None
    if not forced and stage_complete(cfg, stage, directory):
        reuse = str(directory)
    elif forced:
        get_run_logger().info("%s: forced, removing its output", stage)
        _remove_output(stage, directory)
    # the state, since a skipped task's is not its return value; .result() raises a failure
    return TASKS[stage](*args, reuse=reuse, return_state=True).result()["output_dir"], reuse is None


def _stages_to_run(stages: list[str] | None) -> list[str]:
    stages = list(stages or STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


@flow(name="dpo-pipeline", log_prints=True)
def dpo_pipeline(config: PipelineConfig, stages: list[Stage] | None = None, force: list[Stage] | None = None) -> dict:
    """prepare -> score -> audit -> train for one configuration; up-to-date stages are skipped.

    config: the run's configuration (the sections of a dpo YAML file).
    stages: the stages to run (default: all, in pipeline order).
    force: stages to rerun from scratch, with every stage after them.
    """
    cfg = config_from_dict(config_dict(config))  # resolved: absolute paths, every default filled in
    force = _stages_to_run(force) if force else []
    first_forced = min((STAGES.index(s) for s in force), default=len(STAGES))
    outputs: dict[str, str | None] = {}
    ran: dict[str, bool] = {}
    not_run: dict[str, str] = {}  # stages the config does not need, and why
    planned = plan(cfg)  # fingerprints come from the inputs, so they are known before any work
    unneeded = unneeded_reason(cfg)
    for stage in _stages_to_run(stages):
        outputs[stage], ran[stage] = run_stage(cfg, stage, planned[stage], forced=STAGES.index(stage) >= first_forced)
        if unneeded and stage in ("score", "audit"):
            not_run[stage] = unneeded
    lines = ["# dpo-pipeline", "", "| stage | ran | output |", "|---|---|---|"]
    lines += [f"| {s} | {'yes' if ran[s] else f'no, {not_run[s]}' if s in not_run else 'no, up to date'} | "
              f"`{outputs[s]}` |" for s in outputs]
    create_markdown_artifact("\n".join(lines), key="dpo-pipeline", description="stage outputs")
    return {"outputs": outputs, "ran": ran, "not_needed": not_run}
