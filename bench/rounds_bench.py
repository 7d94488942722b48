"""Iterative DPO on the built-in demo, stage by stage: wall time, generation tokens/s, pairs kept.

    .venv/bin/python bench/rounds_bench.py [--rounds 2] [--out bench/results/rounds.json]
    (or `make bench-rounds`)

The rounds of `dpo demo --rounds N` (the tiny demo model after its SFT run, DEMO_SFT_TRAIN; the
demo's rule as the judge function; configs from ``pipeline.models.assets``: DEMO_GENERATE,
DEMO_ROUNDS, DEMO_ROUND_TRAIN) run on a fresh storage by calling each stage's function in the order of the dpo-rounds flow
(flows/rounds_flow.py), without Prefect, so that each stage is timed alone
(``time.perf_counter`` around the call): read prompts once; round 0: generate and judge the
held-out prompts; each round r: generate (its prompts x samples from round r-1's policy), judge
(rewards and pairs), prepare, score, audit, train, then generate and judge the held-out prompts
with its policy. Generation tokens/s: the stage's own count of sampled tokens over its wall time
(transformers on this CPU; vLLM where a GPU and vLLM are present and the backend picks it). Also
reported per round: pairs kept and dropped, the held-out mean reward and the win rate against
round 0. Then, where SmolLM2-135M-Instruct is at hand (pipeline.models.assets.smollm2_folder), its
generation tokens/s on the demo's prompts (``--smollm2 PROMPTS SAMPLES TOKENS``, default 16 x 4 x
64, one batch). Prints a table and writes JSON.
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

from _common import bench_parser, finish

STAGES = ("generate", "judge", "prepare", "score", "audit", "train", "eval generate", "eval judge")


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def demo_config(tmp: Path, rounds: int) -> tuple:
    """`dpo demo --rounds N`'s configuration on a storage in ``tmp``, after its SFT run (timed: the
    second value, seconds)."""
    from pipeline.models.assets import build_demo_assets
    from pipeline.prepare.stage import prepare
    from pipeline.score.stage import score
    from pipeline.train.stage import train

    from flows.cli.rounds_commands import demo_rounds_config, demo_sft_config

    assets = build_demo_assets(tmp / "demo")
    base = {"storage": str(tmp / "storage"), "data": {"path": str(assets["data"]), "eval_fraction": 0.1},
            "model": {"path": str(assets["model"])}, "tokenize": {"max_length": 128, "max_prompt_length": 64}}
    sft = demo_sft_config(base)
    start = time.perf_counter()
    prepare(sft, show_progress=False)
    score(sft, show_progress=False)
    policy = train(sft, show_progress=False).run_dir / "final"
    return demo_rounds_config(base, policy, rounds), time.perf_counter() - start


def evaluate(rounds, r: int) -> tuple[dict, dict]:
    """Round r's policy on the held-out prompts: its rewards, and the two stages' seconds."""
    from pipeline.generate.stage import generate
    from pipeline.judge.stage import judge

    from flows.rounds_flow import judged_completions

    eval_cfg = rounds.eval_config(rounds.policy(r))
    gen, gen_s = timed(generate, eval_cfg, show_progress=False)
    jud, jud_s = timed(judge, eval_cfg, gen.output_dir, make_pairs=False, show_progress=False)
    return judged_completions(str(gen.output_dir), str(jud.output_dir)), {"eval generate": gen_s, "eval judge": jud_s}


def train_round(rounds, r: int) -> tuple[dict, dict]:
    """Round r's generate, judge, prepare, score, audit and train, each timed."""
    from pipeline.audit.checks import audit
    from pipeline.generate.stage import generate
    from pipeline.judge.stage import PAIRS_FILE, judge
    from pipeline.prepare.stage import prepare
    from pipeline.score.stage import score
    from pipeline.train.stage import train

    policy = rounds.policy(r - 1)
    sample_cfg = rounds.sample_config(r, policy)
    seconds: dict = {}
    gen, seconds["generate"] = timed(generate, sample_cfg, show_progress=False)
    jud, seconds["judge"] = timed(judge, sample_cfg, gen.output_dir, show_progress=False)
    train_cfg = rounds.train_config(r, Path(jud.output_dir) / PAIRS_FILE, policy)
    _, seconds["prepare"] = timed(prepare, train_cfg, show_progress=False)
    cache, seconds["score"] = timed(score, train_cfg, show_progress=False)
    _, seconds["audit"] = timed(audit, cache.output_dir, train_cfg, rescore_rows=train_cfg.audit.rescore_rows)
    _, seconds["train"] = timed(train, train_cfg, show_progress=False)
    counts = jud.manifest["counts"]
    return seconds, {"generate tokens/s": gen.stats.get("tokens_per_s"), "generated tokens": gen.stats.get("tokens"),
                     "backend": gen.stats.get("backend"), "pairs kept": counts["pairs"],
                     "dropped": counts["dropped_by_reason"]}


def smollm2_generation(tmp: Path, prompts: int, samples: int, tokens: int) -> dict | None:
    """Generation tokens/s of SmolLM2-135M-Instruct (float32, transformers, this machine) on the
    demo's prompts: a realistic model size for the sampler. None where SmolLM2 is not at hand."""
    from pipeline.config.load import config_from_dict
    from pipeline.errors import AssetError
    from pipeline.generate.stage import generate
    from pipeline.models.assets import build_demo_assets, smollm2_folder

    try:
        model = smollm2_folder()
    except AssetError as exc:
        print(f"SmolLM2 generation: skipped ({exc})")
        return None
    cfg = config_from_dict({"storage": str(tmp / "smollm2"), "data": {"path": str(build_demo_assets(tmp / "demo")["data"])},
                            "model": {"path": str(model)}, "tokenize": {"max_length": 256, "max_prompt_length": 64},
                            "generate": {"num_prompts": prompts, "num_samples": samples, "max_new_tokens": tokens,
                                         "batch_size": prompts * samples, "temperature": 1.0}})
    result = generate(cfg, show_progress=False)
    st = result.stats
    print(f"SmolLM2-135M generation: {st['sequences']} sequences, {st['tokens']} tokens in {st['seconds']:.1f} s: "
          f"{st['tokens_per_s']:.0f} tokens/s ({st['backend']}, {st['device']})")
    return {key: st[key] for key in ("sequences", "tokens", "seconds", "tokens_per_s", "backend", "device")}


def print_table(rows: list[dict]) -> None:
    print(f"{'round':>5} " + " ".join(f"{s:>13}" for s in STAGES) + f" {'gen tok/s':>10} {'pairs':>6} "
          f"{'reward':>7} {'win rate':>8}")
    for row in rows:
        cells = " ".join(f"{row['seconds'].get(s, float('nan')):>12.2f}s" for s in STAGES)
        print(f"{row['round']:>5} {cells} {row.get('generate tokens/s') or float('nan'):>10.0f} "
              f"{row.get('pairs kept', '-'):>6} {row['mean_reward']:>7.3f} {row['win_rate']:>8.3f}")


def main() -> int:
    parser = bench_parser(__doc__, "rounds.json")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smollm2", type=int, nargs=3, default=[16, 4, 64], metavar=("PROMPTS", "SAMPLES", "TOKENS"),
                        help="also time SmolLM2-135M's generation (0 0 0: not)")
    args = parser.parse_args()

    import torch

    from pipeline.generate.stage import read_prompts
    from pipeline.reports.rounds_report import win_rate

    from flows.rounds_plan import plan_rounds

    with tempfile.TemporaryDirectory() as tmp:
        cfg, sft_seconds = demo_config(Path(tmp), args.rounds)
        rounds = plan_rounds(cfg, "bench")
        _, prompts_s = timed(read_prompts, cfg, show_progress=False)
        base, seconds = evaluate(rounds, 0)
        rows = [{"round": 0, "seconds": seconds, "mean_reward": win_rate(base, base)["mean_reward"], "win_rate": 0.5}]
        for r in range(1, args.rounds + 1):
            seconds, row = train_round(rounds, r)
            rewards, eval_seconds = evaluate(rounds, r)
            result = win_rate(base, rewards)
            rows.append({"round": r, "seconds": {**seconds, **eval_seconds}, **row,
                         "mean_reward": result["mean_reward"], "win_rate": result["win_rate"]})
        smollm2 = smollm2_generation(Path(tmp), *args.smollm2) if all(args.smollm2) else None
    print(f"SFT run (round 0's policy): {sft_seconds:.1f} s; prompts read: {prompts_s:.2f} s")
    print_table(rows)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
              "sft_seconds": sft_seconds, "prompts_seconds": prompts_s, "rounds": rows, "smollm2_generation": smollm2}
    return finish(args.out, report)


if __name__ == "__main__":
    raise SystemExit(main())
