"""Training cost with cached reference log-probs vs a reference model kept in memory.

    PYTHONPATH=. .venv/bin/python bench/train_bench.py [--rows 24] [--steps 5] [--batch-size 4]
    (or `make bench-train`)

SmolLM2-135M on an HH slice. Both variants run the trainer's own step, ``Trainer.train_step``,
on a ``Trainer`` from ``build_trainer`` (one shared-prefix forward per micro-batch, the configured
loss, clipping, AdamW, schedule), on the same batches. The only difference is the reference:
- ours: ``trainer.reference`` is the default ``cached_reference`` (the score cache); only the
  policy is in memory;
- baseline: ``trainer.reference`` is swapped for a second, frozen copy of the model (loaded with
  ``models.load_causal_lm``) whose forward (``logprobs.pair_logps`` under ``torch.no_grad()``)
  runs on every batch, as trainers without a cache do.
Each variant runs in its own process so that peak RSS (ru_maxrss) is its own. Prints seconds per
step (first step excluded as warm-up) and peak RSS, writes JSON. The policy starts from the
reference weights, so both variants' first-step loss is ln 2 (checked: they must agree).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, bench_parser, finish, hh_slice


def live_reference(trainer, model):
    """A ``Trainer.reference`` that runs ``model`` (frozen) on the batch instead of reading the cache."""
    import torch

    from pipeline.logprobs.response import PairOptions, pair_logps

    model.requires_grad_(False)

    def reference(split, index):
        picked = [split.prompts[i] for i in index], [split.chosens[i] for i in index], [split.rejecteds[i] for i in index]
        with torch.no_grad(), trainer.autocast():
            return pair_logps(model, *picked, PairOptions(shared=trainer.shared, device=trainer.device))

    return reference


def run_variant(args) -> dict:
    import torch

    from pipeline.config.load import load_config
    from pipeline.models.loading import load_causal_lm
    from pipeline.storage import locate, paths, trust
    from pipeline.train.batches import batch_indices, load_split_data
    from pipeline.train.stage import build_trainer

    cfg = load_config(args.config)
    dataset_dir = locate.find_dataset(cfg)
    cache_dir = locate.find_refscores(cfg, trust.verified_dataset(dataset_dir)["fingerprint"])
    splits, _ = load_split_data(dataset_dir, cache_dir)
    split = splits["train"]
    torch.manual_seed(cfg.train.seed)
    policy = load_causal_lm(paths.policy_init(cfg), "cpu").train()  # float32 master weights, as train()
    trainer = build_trainer(cfg, splits, policy)
    if args.variant == "baseline":
        trainer.reference = live_reference(trainer, load_causal_lm(cfg.model, "cpu"))
    records = [trainer.run_step(step) for step in range(cfg.train.max_steps)]
    times = [r["seconds"] for r in records]
    t = cfg.train
    return {
        "variant": args.variant,
        "seconds_per_step": sum(times[1:]) / max(1, len(times) - 1),
        "step_seconds": times,
        "losses": [r["loss"] for r in records],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_step": sum(2 * len(split.prompts[i]) + len(split.chosens[i]) + len(split.rejecteds[i])
                               for i in batch_indices(1, trainer.batch, len(split), t.seed)),
    }


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, "train.json")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_variants(args: argparse.Namespace) -> list[dict]:
    """Prepare and score an HH slice, then each variant in its own process: [ours, baseline]."""
    from pipeline.config.load import load_config
    from pipeline.models.assets import smollm2_folder
    from pipeline.prepare.stage import prepare
    from pipeline.score.stage import score

    model_dir = smollm2_folder()
    with tempfile.TemporaryDirectory() as tmp:
        data = hh_slice(tmp, args.rows)
        config = Path(tmp) / "bench.yaml"
        config.write_text(json.dumps({
            "storage": tmp, "data": {"path": str(data), "eval_fraction": 0.0},
            "model": {"path": str(model_dir)},
            "tokenize": {"max_length": args.max_length, "max_prompt_length": args.max_length // 2},
            # the step's settings; lr 1e-6, sigmoid loss, beta 0.1, clip 1.0 are the defaults.
            "train": {"per_device_train_batch_size": args.batch_size, "max_steps": args.steps, "device": "cpu",
                      "step0_check": "off"},
        }))
        cfg = load_config(config)
        prepare(cfg, show_progress=False)
        score(cfg, show_progress=False)
        results = []
        for variant in ("ours", "baseline"):
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--config", str(config)],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if out.returncode:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"the {variant} variant failed (exit {out.returncode})")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main() -> int:
    args = parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    results = run_variants(args)
    ours, base = results
    # Same reference numbers, same batches: the first step's loss (policy == reference) agrees.
    if not math.isclose(ours["losses"][0], base["losses"][0], rel_tol=0, abs_tol=1e-4):
        print(f"warning: first-step losses differ: {ours['losses'][0]} vs {base['losses'][0]}", file=sys.stderr)
    print(f"\nSmolLM2-135M, {args.batch_size} HH pairs/step (~{ours['tokens_per_step']} sequence tokens), "
          f"{args.steps - 1} timed steps, CPU ({os.cpu_count()} cores)\n")
    print(f"{'variant':<34}{'s/step':>9}{'peak RSS MB':>13}")
    for r, name in ((ours, "ours (cached reference)"), (base, "baseline (reference in memory)")):
        print(f"{name:<34}{r['seconds_per_step']:>9.2f}{r['peak_rss_mb']:>13.0f}")
    ratio_time = ours["seconds_per_step"] / base["seconds_per_step"]
    ratio_mem = ours["peak_rss_mb"] / base["peak_rss_mb"]
    print(f"{'ratio ours / baseline':<34}{ratio_time:>9.2f}{ratio_mem:>13.2f}   (targets <= 0.80)")
    report = {"bench": "train", "model": "SmolLM2-135M-Instruct", "batch_size": args.batch_size,
              "max_length": args.max_length, "results": results,
              "ratio_time": ratio_time, "ratio_peak_rss": ratio_mem}
    return finish(args.out, report)


if __name__ == "__main__":
    sys.exit(main())
