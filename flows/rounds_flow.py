"""The Prefect flow `dpo-rounds`: iterative DPO, each round's stages as tasks, resumable.

    from flows.rounds_flow import dpo_rounds
    dpo_rounds(config=cfg.to_dict(), name="demo")     # cfg has rounds: and judge: sections

Round 0 judges the starting policy (model.path) on the held-out prompts. Round r = 1..iterations:
generate (completions of its slice of prompts from round r-1's policy) -> judge (a reward per
completion, then pairs) -> the dpo-pipeline flow on the pairs (prepare -> score -> audit ->
train, from round r-1's policy; with the fixed initial reference each round scores only its new
pairs) -> generate and judge the held-out prompts with round r's policy -> the win rate against
round 0. Every stage is content-addressed and skipped when its output exists, so the same command
after a kill (-9, anywhere) resumes where it stopped and ends with the bytes of an uninterrupted
run. After each round: rounds/<name>/round-<r>.json, rounds.json (every round so far) and
report.html, and the round's run gets winrate.json and a report.html that shows it.
"""

# No `from __future__ import annotations`: Prefect builds the parameter model from annotations.
from pathlib import Path
from typing import Optional

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from pipeline.config.load import config_from_dict
from pipeline.config.schema import Config
from pipeline.errors import JudgeError
from pipeline.generate.stage import generate, generation_table, read_prompts
from pipeline.judge.stage import PAIRS_FILE, judge, rewards_table
from pipeline.reports.rounds_report import win_rate, write_rounds_report
from pipeline.reports.run_report import WIN_RATE, write_run_report
from pipeline.storage import metrics, trust
from pipeline.store import atomic_write_json, ensure_dir

from flows.dpo_flow import dpo_pipeline, progress_bars, stage_logs
from flows.params import PipelineConfig, config_dict
from flows.rounds_plan import ROUND_JSON, ROUNDS_JSON, RoundsPlan, check_prompt_count, plan_rounds


def _state(name: str, result: dict, skipped: bool):
    """A task's final state: Completed, named Skipped when the stage's output already existed."""
    if skipped:
        get_run_logger().info("%s: up to date, reusing %s", name, result["output_dir"])
        return Completed(name="Skipped", message=f"up to date: reused {result['output_dir']}", data=result)
    return result


@task(name="prompts", cache_policy=NO_CACHE)
def prompts_task(config: dict) -> dict:
    with stage_logs():
        result = read_prompts(config_from_dict(config), show_progress=progress_bars())
    return _state("prompts", {"output_dir": str(result.output_dir), "count": result.manifest["count"]}, result.skipped)


@task(name="generate", cache_policy=NO_CACHE, task_run_name="generate {label}")
def generate_task(config: dict, label: str) -> dict:
    with stage_logs():
        result = generate(config_from_dict(config), show_progress=progress_bars())
    return _state("generate", {"output_dir": str(result.output_dir), "stats": result.stats}, result.skipped)


@task(name="judge", cache_policy=NO_CACHE, task_run_name="judge {label}")
def judge_task(config: dict, generations_dir: str, make_pairs: bool, label: str) -> dict:
    with stage_logs():
        result = judge(config_from_dict(config), generations_dir, make_pairs=make_pairs, show_progress=progress_bars())
    return _state("judge", {"output_dir": str(result.output_dir), "manifest": result.manifest}, result.skipped)


def judged_completions(generations_dir: str, judgements_dir: str) -> dict[str, tuple[float, int]]:
    """{prompt_id: (reward, completion tokens)} of a one-sample-per-prompt generation."""
    rewards = rewards_table(judgements_dir).to_pydict()
    lengths = generation_table(generations_dir).select(["prompt_id", "num_tokens"]).to_pydict()
    tokens = dict(zip(lengths["prompt_id"], lengths["num_tokens"]))
    return {p: (float(r), int(tokens[p])) for p, r in zip(rewards["prompt_id"], rewards["reward"])}


def evaluate(rounds: RoundsPlan, r: int) -> dict[str, tuple[float, int]]:
    """Round r's policy on the held-out prompts: generated, judged (no pairs)."""
    cfg = rounds.eval_config(rounds.policy(r))
    generated = generate_task(cfg.to_dict(), label=f"eval round {r}", return_state=True).result()
    judged = judge_task(cfg.to_dict(), generated["output_dir"], False, label=f"eval round {r}",
                        return_state=True).result()
    return judged_completions(generated["output_dir"], judged["output_dir"])


def judge_name(cfg: Config) -> str:
    return f"function {cfg.judge.function}" if cfg.judge.function else f"reward model {cfg.judge.reward_model}"


def train_round(rounds: RoundsPlan, r: int) -> dict:
    """Round r's sampling, judging and training; returns its record (without the win rate)."""
    policy = rounds.policy(r - 1)
    sample_cfg = rounds.sample_config(r, policy)
    generated = generate_task(sample_cfg.to_dict(), label=f"round {r}", return_state=True).result()
    judged = judge_task(sample_cfg.to_dict(), generated["output_dir"], True, label=f"round {r}",
                        return_state=True).result()
    manifest = judged["manifest"]
    counts, stats = manifest["counts"], manifest["rewards"]
    if counts["pairs"] == 0:
        raise JudgeError(f"round {r}: no pair was kept from {counts['prompts']} prompts (dropped: "
                         f"{counts['dropped_by_reason']})", hint="sample more completions per prompt "
                         "(generate.num_samples), at a higher generate.temperature, or lower pairs.min_margin")
    train_cfg = rounds.train_config(r, Path(judged["output_dir"]) / PAIRS_FILE, policy)
    flow_result = dpo_pipeline(config=train_cfg.to_dict())
    run_dir = Path(flow_result["outputs"]["train"])
    summary = trust.verified_run(run_dir) or {}
    final_eval = summary.get("final_eval") or {}
    return {
        "round": r, "policy": policy, "run_dir": str(run_dir),
        "generations": generated["output_dir"], "judgements": judged["output_dir"],
        "prompts": counts["prompts"], "samples": counts["completions"], "pairs": counts["pairs"],
        "dropped": counts["dropped"], "dropped_by_reason": counts["dropped_by_reason"],
        "sample_reward_mean": stats["mean"], "sample_reward_std": stats["std"],
        "eval_reward_accuracy": final_eval.get("eval/rewards/accuracies"),
    }


def record_win_rate(rounds: RoundsPlan, record: dict, base: dict, result: dict) -> None:
    """Write the round's win rate into its run folder (winrate.json) and redraw its report.
    ``base``: round 0's record."""
    run_dir = Path(record["run_dir"])
    atomic_write_json(run_dir / WIN_RATE, {
        "round": record["round"], "rounds": rounds.name, "judge": judge_name(rounds.cfg),
        "base_mean_reward": base["mean_reward"], "base_mean_length": base["mean_length"], **result})
    summary = trust.verified_run(run_dir) or {}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    write_run_report(run_dir, metrics.read(metrics.path_of(run_dir)), config,
                     final=summary.get("final_eval") or {"steps": summary.get("steps")})


def save_rounds(rounds: RoundsPlan, records: list[dict]) -> Path:
    """round-<r>.json of the newest round, rounds.json and report.html."""
    directory = ensure_dir(rounds.directory)
    atomic_write_json(directory / ROUND_JSON.format(r=records[-1]["round"]), records[-1])
    atomic_write_json(directory / ROUNDS_JSON, {"name": rounds.name, "iterations": rounds.iterations,
                                                "judge": judge_name(rounds.cfg), "rounds": records})
    return write_rounds_report(directory, rounds.name, records, rounds.iterations)


ROUND0_KEYS = ("mean_reward", "win_rate", "wins", "ties", "losses", "prompts_compared", "mean_length", "length_drift")
"""What round 0's record holds of its comparison with itself."""


@flow(name="dpo-rounds", log_prints=True)
def dpo_rounds(config: PipelineConfig, name: Optional[str] = None) -> dict:
    """Iterative DPO: rounds.iterations rounds of generate -> judge -> prepare -> score -> audit ->
    train, each round's policy judged against the starting one on held-out prompts.

    config: the configuration, with rounds: and judge: sections.
    name: the rounds' folder under <storage>/rounds/ (default: rounds.name, else "rounds").
    """
    cfg = config_from_dict(config_dict(config))
    rounds = plan_rounds(cfg, name or "rounds")
    logger = get_run_logger()
    prompts = prompts_task(cfg.to_dict(), return_state=True).result()  # a skipped task's: its state's data
    check_prompt_count(cfg, prompts["count"], f"the prompts table {prompts['output_dir']}")
    base = evaluate(rounds, 0)
    itself = win_rate(base, base)  # round 0 against itself: all ties, win rate 0.5, no drift
    records = [{"round": 0, "policy": rounds.policy(0), **{key: itself[key] for key in ROUND0_KEYS}}]
    save_rounds(rounds, records)
    logger.info("round 0 (the starting policy): held-out mean reward %.4f", itself["mean_reward"])
    for r in range(1, rounds.iterations + 1):
        record = train_round(rounds, r)
        result = win_rate(base, evaluate(rounds, r))
        record.update(result)
        record_win_rate(rounds, record, records[0], result)
        records.append(record)
        save_rounds(rounds, records)
        logger.info("round %d: held-out mean reward %.4f, win rate %.3f against round 0 (%d pairs trained)",
                    r, result["mean_reward"], result["win_rate"], record["pairs"])
    create_table_artifact([{k: v for k, v in rec.items() if k in ("round", "mean_reward", "win_rate", "pairs",
                                                                     "mean_length")} for rec in records],
                          key="dpo-rounds", description=f"rounds {rounds.name}")
    return {"name": rounds.name, "rounds": records, "report": str(rounds.directory / "report.html"),
            "directory": str(rounds.directory)}
