"""The `dpo` commands: what each subcommand does, on top of `pipeline/` and `flows/`.

`flows/cli/main.py` parses the command line without importing any of this (so `dpo --help` answers
at once), then hands the parsed arguments to ``run``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import STAGES
from pipeline.config.load import config_from_dict, load_config
from pipeline.config.schema import world_size
from pipeline.errors import ConfigError, DistributedError, DpoError, LockBusy, NoServer
from pipeline.prepare.records import REJECT_REASONS
from pipeline.prepare.stage import PrepareResult, prepare
from pipeline.score.stage import ScoreResult, score
from pipeline.storage import metrics, trust
from pipeline.train.launch import launch_log_dir, rank, record_failure, train_argv
from pipeline.train.stage import TrainResult, finished_run, launch, train

from flows.cli.audit_command import cmd_audit
from flows.prefect_settings import apply_prefect_settings


def summarize_prepare(result: PrepareResult) -> str:
    m = result.manifest
    c, t = m["counts"], m["tokens"]
    lines = [
        f"prepare: {'up to date' if result.skipped else 'done'}: {result.output_dir}",
        f"  format {m['format']}; {c['rows_read']} rows read = {c['kept']} kept "
        f"({c['train']} train, {c['eval']} eval) + {c['rejected']} rejected",
    ]
    for reason, count in c["rejected_by_reason"].items():
        lines.append(f"    {count:>7}  {reason}: {REJECT_REASONS.get(reason, '')}")
    lines.append(
        f"  tokens: prompt {t['prompt']}, chosen {t['chosen']}, rejected {t['rejected']}; "
        f"longest sequence {t['max_sequence']}"
    )
    cut = c["prompt_truncated"], c["chosen_truncated"], c["rejected_truncated"]
    if any(cut):
        lines.append(f"  truncated: {cut[0]} prompts, {cut[1]} chosen, {cut[2]} rejected")
    if c["chat_boundary_retokenized"]:
        lines.append(
            f"  {c['chat_boundary_retokenized']} chat rows tokenize differently across the "
            "prompt/response boundary; the separate tokenization (as in generation) is kept"
        )
    if c["rejected"]:
        lines.append(f"  rejected rows and reasons: {result.output_dir / 'rejects.parquet'}")
    return "\n".join(lines)


def summarize_score(result: ScoreResult) -> str:
    m, st = result.manifest, result.stats
    inputs = m["inputs"]
    lines = [
        f"score: {'up to date' if result.skipped else 'done'}: {result.output_dir}",
        f"  {m['rows']} examples, {len(m['shards'])} shards; backend {inputs['backend']}, "
        f"dtype {inputs['dtype']}; response tokens: chosen {m['tokens']['chosen']}, "
        f"rejected {m['tokens']['rejected']}",
    ]
    if not result.skipped and st["rows_scored"]:
        workers = f" by {st['workers']} {st['runner']} workers" if st.get("workers", 1) > 1 or st.get("runner") == "ray" else ""
        lines.append(
            f"  this run scored {st['rows_scored']} rows ({st['sequence_tokens']} tokens through "
            f"the model){workers} in {st['seconds']:.1f} s, {st['tokens_per_s']:,.0f} tok/s on {st.get('device')}"
        )
    if not result.skipped and st.get("rows_reused"):
        donors = ", ".join(f"{n} from {fp[:12]}" for fp, n in m.get("reused_from", {}).items())
        lines.append(f"  reused {st['rows_reused']} rows already scored in other caches ({donors}); "
                     f"scored {st['rows_scored']} new")
    for name, why in sorted(st.get("rescored", {}).items()):
        lines.append(f"  rescored {name}: {why}")
    return "\n".join(lines)


def cmd_score(args) -> Path:
    cfg = load_config(args.config, args.overrides)
    result = score(cfg, show_progress=not args.no_progress)
    print(summarize_score(result), file=sys.stderr)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps({**result.stats, "output_dir": str(result.output_dir)}))
    return result.output_dir


def starts_prefect(command):
    """Marks a command that imports Prefect (itself or through a helper): flows/prefect_settings.py's
    settings (telemetry off, the ephemeral server's start-up timeout) are applied before it runs,
    so before Prefect is imported. tests/flows/test_prefect_settings.py checks that every command that
    reaches Prefect has it."""

    @functools.wraps(command)
    def with_prefect_settings(args):
        apply_prefect_settings()
        return command(args)

    return with_prefect_settings


def _flow_progress(no_progress: bool) -> None:
    """Progress bars for the stages of a flow this command runs in a terminal, with the progress
    log lines still going to the flow run's logs (see pipeline/progress.py)."""
    if not no_progress and sys.stderr.isatty():
        os.environ["DPO_PROGRESS_BARS"] = os.environ["DPO_PROGRESS_LOG"] = "1"


@starts_prefect
def cmd_run(args) -> Path:
    _flow_progress(args.no_progress)
    from flows.dpo_flow import dpo_pipeline

    cfg = load_config(args.config, args.overrides)
    if cfg.sweep is not None:
        print(f"note: {args.config} has a sweep: section; dpo run trains its base config once (dpo sweep -c "
              f"{args.config} trains the sweep's points)", file=sys.stderr)
    stages = list(args.only or STAGES)
    if args.from_stage:
        stages = [s for s in stages if STAGES.index(s) >= STAGES.index(args.from_stage)]
    result = dpo_pipeline(config=cfg.to_dict(), stages=stages, force=args.force)
    print_flow_result(result)
    last = result["outputs"][stages[-1]]
    return Path(last) if last else Path(cfg.storage)


def print_flow_result(result: dict) -> None:
    for stage, output in result["outputs"].items():
        if stage in result.get("not_needed", {}):  # a reference-free loss: no score, no audit
            print(f"{stage}: skipped: {result['not_needed'][stage]}", file=sys.stderr)
            continue
        print(f"{stage}: {'ran' if result['ran'][stage] else 'up to date'}: {output}", file=sys.stderr)


@starts_prefect
def cmd_sweep(args) -> Path:
    from flows.sweep_plan import parse_grid, plan_sweep

    cfg = load_config(args.config, args.overrides)
    grid, name = parse_grid(args.grid), Path(args.config).stem
    sweep = plan_sweep(cfg, grid, name)  # refused here, before Prefect is imported, when a point is bad
    print(f"sweep {sweep.name}: {len(sweep.points)} points; report: {sweep.directory / 'report.html'}", file=sys.stderr)
    _flow_progress(args.no_progress)
    from flows.sweep_flow import dpo_sweep

    result = dpo_sweep(config=cfg.to_dict(), grid=grid, name=name)
    print_sweep_table(result["rows"], result["sweep"])
    return Path(result["report"])


def print_sweep_table(rows: list[dict], name: str) -> None:
    """The sweep's table, best first, on stderr."""
    print(f"sweep {name}:", file=sys.stderr)
    for row in rows:
        values = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("point", "report") and v is not None)
        print(f"  {row['point']}: {values}", file=sys.stderr)


@starts_prefect
def cmd_serve(args) -> Path:
    from flows.dpo_flow import api_url

    cfg = load_config(args.config, args.overrides)
    if not api_url():
        raise NoServer(
            "scheduling needs a running Prefect server, and only the ephemeral API is available. "
            "Start one with `prefect server start --host 127.0.0.1` (in another terminal), then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and run `dpo serve` again"
        )
    served = _served_flow(args, cfg)
    if args.work_pool:
        return _deploy(args, cfg, served)
    print(f"serving deployment {served.flow.name}/{served.name} on {api_url()} with cron {args.cron!r}; "
          "Ctrl-C stops it", file=sys.stderr)
    served.flow.serve(name=served.name, cron=args.cron, parameters=served.parameters, print_starting_message=False)
    return Path(cfg.storage)


@dataclass
class ServedFlow:
    flow: Any
    entrypoint: str
    name: str
    parameters: dict


def _served_flow(args, cfg) -> ServedFlow:
    """The flow `dpo serve` schedules: the pipeline, or with --sweep the config's sweep (its
    points checked now, not at 3 in the morning)."""
    if args.rounds:
        if args.sweep or args.grid:
            raise ConfigError("--rounds schedules iterative DPO, --sweep a sweep", hint="choose one")
        from flows.cli.rounds_commands import rounds_name
        from flows.rounds_flow import dpo_rounds
        from flows.rounds_plan import plan_rounds

        rounds = plan_rounds(cfg, rounds_name(cfg, args.config))
        return ServedFlow(dpo_rounds, "flows.rounds_flow.dpo_rounds", args.name or "dpo-rounds",
                          {"config": cfg.to_dict(), "name": rounds.name})
    if not args.sweep:
        if args.grid:
            raise ConfigError("--grid schedules a sweep", hint="add --sweep")
        from flows.dpo_flow import dpo_pipeline

        return ServedFlow(dpo_pipeline, "flows.dpo_flow.dpo_pipeline", args.name or "dpo-pipeline",
                          {"config": cfg.to_dict()})
    from flows.sweep_flow import dpo_sweep
    from flows.sweep_plan import parse_grid, plan_sweep

    grid, stem = parse_grid(args.grid), Path(args.config).stem
    sweep = plan_sweep(cfg, grid, stem)
    return ServedFlow(dpo_sweep, "flows.sweep_flow.dpo_sweep", args.name or "dpo-sweep",
                      {"config": cfg.to_dict(), "grid": grid or None, "name": sweep.name})


def _deploy(args, cfg, served: ServedFlow) -> Path:
    """`dpo serve --work-pool POOL`: register the deployment on a work pool with Flow.deploy
    (code from --source, no image built or pushed) and return; a worker polling the pool runs
    the flow, on this machine or another one that sees the same code, storage and model paths."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.dpo_flow import api_url

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(args.work_pool)
        except ObjectNotFound:
            raise NoServer(f"work pool {args.work_pool!r} does not exist on {api_url()}", hint="create it with "
                           f"`prefect work-pool create --type process {args.work_pool}`, then run dpo serve again")
    source = args.source or str(Path(__file__).resolve().parent.parent)  # the folder that holds flows/
    # a module path (the flow file named as a module of the folder that holds flows/)
    flow = served.flow.from_source(source=source, entrypoint=served.entrypoint)
    flow.deploy(name=served.name, work_pool_name=args.work_pool, work_queue_name=args.work_queue,
                cron=args.cron, parameters=served.parameters, build=False, push=False,
                print_next_steps=False, ignore_warnings=True)
    print(f"deployment {served.flow.name}/{served.name} registered on work pool {args.work_pool} ({api_url()}) "
          f"with cron {args.cron!r}, code from {source}. Start a worker where it should run: "
          f"prefect worker start --pool {args.work_pool}", file=sys.stderr)
    return Path(cfg.storage)


def cmd_status(args) -> Path:
    from flows.plan import plan, stage_problem

    cfg = load_config(args.config, args.overrides)
    planned = plan(cfg)
    for stage in STAGES:
        directory = planned[stage]
        if stage in ("score", "audit") and not cfg.train.needs_reference() and not directory.exists():
            print(f"{stage:<8} {'not needed':<10} {'':>13}  (loss_type {'+'.join(cfg.train.loss_names())} is "
                  "reference-free: no reference cache)")
            continue
        problem = None
        if not directory.exists():
            state, size = "missing", 0
        else:  # complete means verified: every file present and matching its manifest
            problem = stage_problem(cfg, stage, directory)
            state = "complete" if problem is None else "incomplete"
            size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        print(f"{stage:<8} {state:<10} {size / 1e6:>10.1f} MB  {directory}")
        if problem is not None and stage in ("prepare", "score"):  # which file, and what to do
            print(f"         {problem}")
        if stage == "train" and directory.exists():
            print(f"         {run_progress(cfg, directory)}")
    if cfg.sweep is not None or args.grid:
        print_sweep_status(cfg, args.grid, Path(args.config).stem)
    if cfg.rounds is not None:
        from flows.cli.rounds_commands import print_rounds_status, rounds_name

        print_rounds_status(cfg, rounds_name(cfg, args.config))
    return Path(cfg.storage)


def print_sweep_status(cfg, grid_args: list[str], default_name: str) -> None:
    """The config's sweep: each point's state (finished, running or stopped at which step, failed
    and why, not started) and its run folder."""
    from flows.sweep_plan import parse_grid, plan_sweep, point_state, read_point

    sweep = plan_sweep(cfg, parse_grid(grid_args), default_name)
    states = [point_state(sweep, p) for p in sweep.points]
    print(f"sweep {sweep.name}: {states.count('finished')} of {len(states)} points finished; "
          f"report: {sweep.directory / 'report.html'}")
    for point, state in zip(sweep.points, states):
        print(f"  {point.name:<40} {state:<11} {point.run_dir}")
        if state != "finished" and point.run_dir.exists():
            print(f"      {run_progress(point.config, point.run_dir)}")
        if state == "failed":  # the error's first line, and its last one (a child's last output)
            lines = (read_point(sweep.directory, point.name).get("error") or "").splitlines() or [""]
            print("\n".join(f"      {line[:300]}" for line in dict.fromkeys([lines[0], lines[-1]])))


def run_progress(cfg, run_dir: Path) -> str:
    """One line on a run: finished, or running / stopped at which step, on how many processes."""
    from pipeline.store import exclusive, lock_path
    from pipeline.train.checkpoint import list_checkpoints

    summary = trust.verified_run(run_dir)
    if summary is not None:
        settings = summary.get("settings", {})
        processes = settings.get("world_size", 1)
        engine = f" ({settings['distributed']})" if settings.get("distributed") else ""
        return f"finished: {summary['steps']} steps on {processes} process(es){engine}"
    steps = [r.get("step", 0) for r in metrics.read(metrics.path_of(run_dir)) if "loss" in r]
    checkpoints = list_checkpoints(run_dir)
    try:
        with exclusive(lock_path(cfg.storage, "runs", run_dir.name), f"run {run_dir}", wait=False):
            activity = "stopped"
    except LockBusy as exc:
        activity = f"running ({str(exc).split('(', 1)[-1].split(')', 1)[0]})"
    last = f"last logged step {max(steps)}" if steps else "no step logged yet"
    resume = f"resumable from {checkpoints[-1].name} (--resume)" if checkpoints else "no checkpoint"
    return (f"{activity}: {last}; {resume}; {world_size(cfg.train)} process(es) "
            f"({cfg.train.distributed if world_size(cfg.train) > 1 else 'single'})")


def summarize_train(result: TrainResult) -> str:
    s = result.summary
    lines = [f"train: {'up to date' if result.skipped else 'done'}: {result.run_dir}",
             f"  {s['steps']} steps on {s['train_examples']} train pairs; weights in {s['final_dir']}"]
    first, last = s.get("first_eval"), s.get("final_eval")
    if last:
        before = f"{first['eval/rewards/accuracies']:.3f} -> " if first else ""
        lines.append(
            f"  eval ({s['eval_examples']} pairs): reward accuracy {before}"
            f"{last['eval/rewards/accuracies']:.3f}, margin {last['eval/rewards/margins']:.3f}, "
            f"loss {last['eval/loss']:.4f}"
        )
    return "\n".join(lines)


def cmd_train(args) -> Path:
    overrides = list(args.overrides)
    if args.nproc_per_node is not None:
        overrides.append(f"train.nproc_per_node={args.nproc_per_node}")
    cfg = load_config(args.config, overrides)
    if world_size(cfg.train) > 1 and "LOCAL_RANK" not in os.environ:  # not yet under torchrun
        result = launch_train(cfg, args.config, overrides, args.resume, args.no_progress)
    else:
        result = train(cfg, resume=args.resume, show_progress=not args.no_progress)
    if rank() == 0 and not os.environ.get(LAUNCHED):  # a launcher prints it once
        print(summarize_train(result), file=sys.stderr)
    return result.run_dir


def launch_train(cfg, config_path: str, overrides: list[str], resume: bool, no_progress: bool) -> TrainResult:
    """`dpo train` as train.nproc_per_node processes under torchrun (this command, in each)."""
    if cfg.train.nnodes > 1:
        raise ConfigError(
            f"train.nnodes={cfg.train.nnodes}: start torchrun on every node yourself, e.g. `torchrun "
            f"--nnodes {cfg.train.nnodes} --node-rank R --nproc-per-node {cfg.train.nproc_per_node} "
            "--rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id RUN -m flows.cli train -c CONFIG` (docs/scaling.md)"
        )
    done = finished_run(cfg)
    if done is not None:
        return done  # up to date: no processes to start
    argv = train_argv(config_path, overrides, resume, no_progress)
    log_dir = launch_log_dir(cfg.storage)
    print(f"train: {cfg.train.nproc_per_node} processes under torchrun ({cfg.train.distributed}); "
          f"their logs: {log_dir}", file=sys.stderr)
    try:
        return launch(cfg, argv, log_dir, env={LAUNCHED: "1"})
    except DistributedError as exc:  # what to do: the checkpoints written so far are kept
        again = "the same command again" if resume else "the same command again with --resume"
        raise DistributedError(f"{exc}\nthe run's checkpoints are kept", hint=f"run {again} to continue from the "
                               "last one") from None


def cmd_prepare(args) -> Path:
    cfg = load_config(args.config, args.overrides)
    result = prepare(cfg, show_progress=not args.no_progress)
    print(summarize_prepare(result), file=sys.stderr)
    return result.output_dir


@starts_prefect
def cmd_demo(args) -> Path:
    from pipeline.models.assets import DEMO_TRAIN, build_demo_assets

    storage = Path(args.storage).resolve()
    assets = build_demo_assets(storage / "demo")
    print(f"demo assets: model {assets['model']}, data {assets['data']}", file=sys.stderr)
    cfg = config_from_dict(
        {
            "storage": str(storage),
            "data": {"path": str(assets["data"]), "eval_fraction": 0.1},
            "model": {"path": str(assets["model"])},
            "tokenize": {"max_length": 128, "max_prompt_length": 64},
            "train": DEMO_TRAIN,
        }
    )
    from flows.dpo_flow import dpo_pipeline

    if args.rounds is not None:
        from flows.cli.rounds_commands import demo_rounds
        from flows.rounds_flow import dpo_rounds

        return demo_rounds((dpo_pipeline, dpo_rounds), cfg.to_dict(), args.rounds, args.no_progress)

    _flow_progress(args.no_progress)
    result = dpo_pipeline(config=cfg.to_dict())
    print_flow_result(result)
    run_dir = Path(result["outputs"]["train"])
    print(summarize_train(TrainResult(run_dir, json.loads((run_dir / "run.json").read_text()), False)),
          file=sys.stderr)
    return run_dir


@starts_prefect
def cmd_rounds(args) -> Path:
    from flows.cli.rounds_commands import rounds_name, run_rounds
    from flows.rounds_flow import dpo_rounds

    cfg = load_config(args.config, args.overrides)
    return run_rounds(dpo_rounds, cfg, rounds_name(cfg, args.config), args.no_progress)


def cmd_generate(args) -> Path:
    from flows.cli.rounds_commands import cmd_generate as generate

    return generate(args)


def cmd_judge(args) -> Path:
    from flows.cli.rounds_commands import cmd_judge as judge

    return judge(args)


COMMANDS = {"prepare": cmd_prepare, "score": cmd_score, "train": cmd_train, "run": cmd_run, "sweep": cmd_sweep,
            "serve": cmd_serve, "status": cmd_status, "audit": cmd_audit, "demo": cmd_demo,
            "generate": cmd_generate, "judge": cmd_judge, "rounds": cmd_rounds}


LAUNCHED = "DPO_LAUNCHED"
"""Set in the processes `dpo train` starts under torchrun: the launcher reports for them."""



def run(args) -> int:
    """Run a parsed command; a user's error is one `error: ...` line and exit status 1 (2 for a
    config error), anything else keeps its traceback."""
    try:
        output_dir = COMMANDS[args.command](args)
    except DpoError as exc:  # a user's error (pipeline/errors.py); anything else is a bug
        print(f"error: {exc}", file=sys.stderr)
        record_failure(exc)  # under torchrun: which rank failed, for the launcher
        return exc.exit_code
    except BaseException as exc:
        record_failure(exc)
        raise
    if output_dir is not None and rank() == 0:
        print(output_dir)
    return 0
