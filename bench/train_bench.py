"""Training cost with cached reference log-probs vs a reference model kept in memory.

    .venv/bin/python bench/train_bench.py [--rows 24] [--steps 5] [--batch-size 4]

SmolLM2-135M on an HH slice. Both variants run the same loop (the trainer's pieces: one
shared-prefix forward per micro-batch via logprobs.pair_logps, the sigmoid loss, AdamW), on the
same batches:
- ours: reference log-probs read from the score cache; only the policy is in memory;
- baseline: a second copy of the model as reference, its forward (no grad) run on every batch,
  as trainers without a cache do.
Each variant runs in its own process so that peak RSS (ru_maxrss) is its own. Prints seconds per
step (first step excluded as warm-up) and peak RSS, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, hh_slice, write_report  # noqa: E402


def run_variant(args) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.logprobs import pair_logps
    from pipeline.losses import sigmoid_loss
    from pipeline.models import load_causal_lm
    from pipeline.prepare import locate_dataset
    from pipeline.train import batch_indices, load_split_data, locate_ref_cache

    cfg = load_config(args.config)
    dataset_dir = locate_dataset(cfg)
    splits, cache = load_split_data(dataset_dir, locate_ref_cache(cfg, json.loads((dataset_dir / "manifest.json").read_text())["fingerprint"]))
    split = splits["train"]
    torch.manual_seed(0)
    policy = load_causal_lm(cfg.model, "cpu").train()
    reference = load_causal_lm(cfg.model, "cpu") if args.variant == "baseline" else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        index = batch_indices(step, args.batch_size, len(split), 0)
        batch = ([split.prompts[i] for i in index], [split.chosens[i] for i in index], [split.rejecteds[i] for i in index])
        if reference is None:
            ref_chosen, ref_rejected = split.ref_chosen[index].float(), split.ref_rejected[index].float()
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = pair_logps(reference, *batch)
        chosen, rejected = pair_logps(policy, *batch)
        loss = sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "variant": args.variant,
        "seconds_per_step": sum(times[1:]) / max(1, len(times) - 1),
        "step_seconds": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_step": sum(2 * len(split.prompts[i]) + len(split.chosens[i]) + len(split.rejecteds[i])
                               for i in batch_indices(1, args.batch_size, len(split), 0)),  # fmt: skip
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    from pipeline.assets import smollm2_folder
    from pipeline.config import load_config
    from pipeline.prepare import prepare
    from pipeline.score import score

    model_dir = smollm2_folder()
    with tempfile.TemporaryDirectory() as tmp:
        data = hh_slice(tmp, args.rows)
        config = Path(tmp) / "bench.yaml"
        config.write_text(json.dumps({
            "storage": tmp, "data": {"path": str(data), "eval_fraction": 0.0},
            "model": {"path": str(model_dir)},
            "tokenize": {"max_length": args.max_length, "max_prompt_length": args.max_length // 2},
        }))  # fmt: skip
        cfg = load_config(config)
        prepare(cfg, show_progress=False)
        score(cfg, show_progress=False)
        results = []
        for variant in ("ours", "baseline"):
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--config", str(config),
                 "--steps", str(args.steps), "--batch-size", str(args.batch_size)],
                check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ours, base = results
    print(f"\nSmolLM2-135M, {args.batch_size} HH pairs/step (~{ours['tokens_per_step']} sequence tokens), "
          f"{args.steps - 1} timed steps, CPU ({os.cpu_count()} cores)\n")  # fmt: skip
    print(f"{'variant':<34}{'s/step':>9}{'peak RSS MB':>13}")
    for r, name in ((ours, "ours (cached reference)"), (base, "baseline (reference in memory)")):
        print(f"{name:<34}{r['seconds_per_step']:>9.2f}{r['peak_rss_mb']:>13.0f}")
    ratio_time = ours["seconds_per_step"] / base["seconds_per_step"]
    ratio_mem = ours["peak_rss_mb"] / base["peak_rss_mb"]
    print(f"{'ratio ours / baseline':<34}{ratio_time:>9.2f}{ratio_mem:>13.2f}   (targets <= 0.80)")
    report = {"bench": "train", "model": "SmolLM2-135M-Instruct", "batch_size": args.batch_size,
              "max_length": args.max_length, "results": results,
              "ratio_time": ratio_time, "ratio_peak_rss": ratio_mem}  # fmt: skip
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
