"""The `dpo` commands of iterative DPO: generate, judge, rounds, and the rounds part of status and demo.

    dpo generate -c run.yaml        # completions of the generate: section's prompts
    dpo judge -c run.yaml           # their rewards and pairs (judge:, pairs:)
    dpo rounds -c run.yaml          # the dpo-rounds flow (rounds:)
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config.load import config_from_dict, load_config
from pipeline.config.schema import Config
from pipeline.errors import ConfigError
from pipeline.generate.stage import GenerateResult, generate, read_prompts
from pipeline.judge.pairs import DROP_REASONS
from pipeline.judge.stage import PAIRS_FILE, JudgeResult, judge
from pipeline.storage import locate, paths, trust
from pipeline.store import fingerprint, read_json

from flows.rounds_plan import ROUND_JSON, plan_rounds


def summarize_generate(result: GenerateResult) -> str:
    m, st = result.manifest, result.stats
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(m.get("finish_reasons", {}).items()))
    lines = [f"generate: {'up to date' if result.skipped else 'done'}: {result.output_dir}",
             f"  {m['prompts']} prompts x {m['samples_per_prompt']} samples = {m['rows']} completions, "
             f"{m['tokens']} tokens (finish: {reasons}); backend {m['identity']['backend']}"]
    if not result.skipped and st.get("tokens"):
        lines.append(f"  this run generated {st['tokens']} tokens in {st['seconds']:.1f} s, "
                     f"{st['tokens_per_s']:,.0f} tok/s on {st.get('device')}")
    return "\n".join(lines)


def summarize_judge(result: JudgeResult) -> str:
    m = result.manifest
    c, r = m["counts"], m["rewards"]
    lines = [f"judge: {'up to date' if result.skipped else 'done'}: {result.output_dir}",
             f"  {c['completions']} completions of {c['prompts']} prompts: reward mean {r['mean']:.4g}, "
             f"std {r['std']:.4g}, min {r['min']:.4g}, max {r['max']:.4g}"]
    if PAIRS_FILE in m.get("files", {}) or c.get("pairs"):
        lines.append(f"  pairs: {c['pairs']} kept, {c['dropped']} prompts dropped")
        for reason, n in c["dropped_by_reason"].items():
            lines.append(f"    {n:>7}  {reason}: {DROP_REASONS.get(reason, '')}")
        lines.append(f"  pairs file (preference data for dpo prepare): {result.output_dir / PAIRS_FILE}")
    return "\n".join(lines)


def cmd_generate(args) -> Path:
    cfg = load_config(args.config, args.overrides)
    result = generate(cfg, show_progress=not args.no_progress)
    print(summarize_generate(result), file=sys.stderr)
    return result.output_dir


def generations_for(cfg: Config) -> Path:
    """The generations `dpo generate` makes for ``cfg``, verified; else what to run."""
    prompts = locate.prompts_dir_for(cfg)
    directory = locate.generations_dir_for(cfg, prompts.name)
    if not trust.is_verified(trust.verified_generations, directory):
        raise ConfigError(f"no complete generations for this config ({directory})",
                          hint="run `dpo generate -c CONFIG` first, or name a folder with --generations")
    return directory


def cmd_judge(args) -> Path:
    cfg = load_config(args.config, args.overrides)
    if cfg.judge is None:
        raise ConfigError("dpo judge needs a judge: section", hint="set judge.function (module:function) or "
                          "judge.reward_model, e.g. --set judge.function=mypkg.rules:reward")
    directory = Path(args.generations) if args.generations else generations_for(cfg)
    result = judge(cfg, directory, make_pairs=not args.no_pairs, show_progress=not args.no_progress)
    print(summarize_judge(result), file=sys.stderr)
    return result.output_dir


def print_rounds(result: dict) -> None:
    """Mean reward and win rate per round (round 0: the starting policy), on stderr."""
    print(f"rounds {result['name']}: held-out mean reward and win rate against round 0", file=sys.stderr)
    for record in result["rounds"]:
        pairs = f", {record['pairs']} pairs trained" if record["round"] else " (the starting policy)"
        print(f"  round {record['round']}: mean reward {record['mean_reward']:.3f}, win rate "
              f"{record['win_rate']:.3f}, mean length {record['mean_length']:.1f} tokens{pairs}", file=sys.stderr)
    print(f"  report: {result['report']}", file=sys.stderr)


def run_rounds(dpo_rounds, cfg: Config, name: str, no_progress: bool) -> Path:
    """Run ``dpo_rounds`` (the flow, imported by the command with Prefect's settings applied) on ``cfg``."""
    from flows.cli.commands import _flow_progress

    plan_rounds(cfg, name)  # refused here, before the flow starts
    _flow_progress(no_progress)
    result = dpo_rounds(config=cfg.to_dict(), name=name)
    print_rounds(result)
    return Path(result["report"])


def rounds_name(cfg: Config, config_path: str) -> str:
    return (cfg.rounds.name if cfg.rounds and cfg.rounds.name else None) or Path(config_path).stem


def demo_sft_config(base: dict) -> Config:
    """The demo's SFT run (round 0's policy): DEMO_SFT_TRAIN on the demo's SFT rows, next to its data."""
    from pipeline.models.assets import DEMO_SFT_TRAIN, build_demo_sft_data

    sft_data = build_demo_sft_data(Path(base["data"]["path"]).parent)
    return config_from_dict({**base, "data": {**base["data"], "path": str(sft_data)}, "train": DEMO_SFT_TRAIN})


def demo_rounds_config(base: dict, policy: Path, iterations: int) -> Config:
    """The demo's rounds from ``policy``, the demo's rule as the judge, prompts_per_round cut to
    what the demo's prompts allow for ``iterations`` (at least 1) rounds (refused below 8)."""
    from pipeline.models.assets import DEMO_GENERATE, DEMO_ROUND_TRAIN, DEMO_ROUNDS

    raw = {**base, "model": {**base["model"], "path": str(policy)}, "train": DEMO_ROUND_TRAIN,
           "generate": DEMO_GENERATE, "judge": {"function": "pipeline.models.assets:demo_reward"},
           "rounds": {**DEMO_ROUNDS, "iterations": iterations}}
    available = read_prompts(config_from_dict(raw), show_progress=False).manifest["count"]
    per_round = min(DEMO_ROUNDS["prompts_per_round"], (available - DEMO_ROUNDS["eval_prompts"]) // iterations)
    if per_round < 8:
        raise ConfigError(f"--rounds {iterations}: the demo's {available} prompts are too few for that many rounds",
                          hint=f"run at most {(available - DEMO_ROUNDS['eval_prompts']) // 8} rounds")
    return config_from_dict({**raw, "rounds": {**raw["rounds"], "prompts_per_round": per_round}})


def demo_rounds(flows: tuple, base: dict, iterations: int, no_progress: bool) -> Path:
    """`dpo demo --rounds N`: a short SFT run teaches the tiny model the demo's words (the
    dpo-pipeline flow with loss_type sft: round 0's policy), then N rounds of iterative DPO from
    it, the demo's rule as the judge. ``flows``: (dpo_pipeline, dpo_rounds)."""
    from pipeline.models.assets import DEMO_SFT_TRAIN

    from flows.cli.commands import _flow_progress

    if iterations < 1:
        raise ConfigError(f"--rounds {iterations}: run at least one round", hint="e.g. dpo demo --rounds 2")
    dpo_pipeline, dpo_rounds = flows
    _flow_progress(no_progress)
    policy = Path(dpo_pipeline(config=demo_sft_config(base).to_dict())["outputs"]["train"]) / "final"
    print(f"round 0's policy: the demo model after {DEMO_SFT_TRAIN['max_steps']} SFT steps, {policy}", file=sys.stderr)
    cfg = demo_rounds_config(base, policy, iterations)
    return run_rounds(dpo_rounds, cfg, cfg.rounds.name, no_progress)


def print_rounds_status(cfg: Config, default_name: str) -> None:
    """Each round of the config's rounds: finished (its win rate) or where it stopped."""
    rounds = plan_rounds(cfg, default_name)
    print(f"rounds {rounds.name}: {rounds.iterations} rounds; report: {rounds.directory / 'report.html'}")
    prompts = locate.prompts_dir_for(cfg)
    for r in range(rounds.iterations + 1):
        record = read_json(rounds.directory / ROUND_JSON.format(r=r))
        if record is not None:
            extra = f", {record['pairs']} pairs" if r else " (the starting policy)"
            print(f"  round {r}: finished: mean reward {record['mean_reward']:.4g}, win rate "
                  f"{record['win_rate']:.3f}{extra}")
            continue
        print(f"  round {r}: {_round_state(rounds, r, prompts)}")


def _round_state(rounds, r: int, prompts: Path) -> str:
    """Where round r stopped: the first of its stages whose output is not complete."""
    policy = rounds.policy(r - 1) if r else rounds.policy(0)
    if r and trust.verified_run(Path(policy).parent) is None:
        return f"not started (round {r - 1} has not finished)"
    steps = []
    if r:
        steps.append(("generate", rounds.sample_config(r, policy), True))
    if not r or trust.verified_run(rounds.run_dir(r)) is not None:
        steps.append(("eval generate", rounds.eval_config(rounds.policy(r)), False))
    for label, step_cfg, pairs in steps:
        generations = locate.generations_dir_for(step_cfg, prompts.name)
        if not trust.is_verified(trust.verified_generations, generations):
            return f"stopped in {label} ({generations})"
        judged = paths.judgements_dir(step_cfg.storage, fingerprint(paths.judgements_identity(
            step_cfg, generations.name, pairs)))
        if not trust.is_verified(trust.verified_judgements, judged):
            return f"stopped in {label.replace('generate', 'judge')} ({judged})"
    if r and trust.verified_run(rounds.run_dir(r)) is None:
        return f"stopped in prepare -> score -> audit -> train ({rounds.run_dir(r)}; dpo rounds resumes it)"
    return "stopped after its evaluation (dpo rounds writes its record)"
