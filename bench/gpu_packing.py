"""GPU: tokens/s of padding-free (packed) vs padded pair batches, per attention kernel, in scoring
and training, and how far the packed values are from the padded ones.

Runs on the lent GPU machine with the bundle of bench/gpu_check.py (HH token ids and SmolLM2's
config and tokenizer; the weights are a seeded random init of each shape, see gpu_check.py):

  here:  .venv/bin/python bench/gpu_check.py --make-bundle .gpu_bundle --rows 1024
  GPU:   PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_packing.py --bundle .gpu_bundle

For each model shape and attention kernel (sdpa: dense [B, 1, T, T] mask; flex_attention:
block-sparse BlockMask; eager on the small shape only) and each layout (none: one right-padded
row per pair; fit: pairs first-fit into rows as long as the longest pair; flat: one row per
batch, no padding):
- scoring: the transformers scorer (pipeline/logprobs/backends/transformers_backend.py) over all rows,
  tokens_per_batch 16384: real tokens (prompt once + both responses) per second, and the max
  |diff| per token against the padded sdpa run of the same dtype;
- training: forward + backward of random micro-batches of --micro pairs (sigmoid loss against
  zero references, no optimizer step: its cost does not depend on the layout), real tokens/s, peak
  GPU memory, and the relative gradient difference on the first batch against padded sdpa.
Also float32 exactness of every kernel x layout against a float64 eager padded run on 64 rows.
Prints tables; writes JSON to $OUT/gpu_packing.json (or --out), after each part.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gpu_check import build_model

from _common import ROOT, bench_parser, finish, save_report

LAYOUTS = ("none", "fit", "flat")


DEVICE = "cuda"


def sync():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def load(model_dir: Path, kernel: str, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=kernel).to(DEVICE)


def score_run(model_dir: Path, kernel: str, dtype: str, layout: str, data, tokens_per_batch: int):

    from pipeline.config.load import config_from_dict
    from pipeline.logprobs.backends.transformers_backend import TransformersScorer

    cfg = config_from_dict({"data": {"path": "unused"},
                            "model": {"path": str(model_dir), "dtype": dtype, "attn_implementation": kernel},
                            "score": {"backend": "transformers", "device": DEVICE}})
    started = time.perf_counter()
    scorer = TransformersScorer(cfg, {"tokens_per_batch": tokens_per_batch, "prefix_sharing": True,
                                      "packing": layout})
    prompts, chosens, rejecteds = data
    scorer.score_pairs(prompts[:64], chosens[:64], rejecteds[:64])  # warm-up (compilation)
    sync()
    setup = time.perf_counter() - started
    start = time.perf_counter()
    chosen, rejected = scorer.score_pairs(prompts, chosens, rejecteds)
    sync()
    seconds = time.perf_counter() - start
    del scorer
    return [np.asarray(v) for v in chosen + rejected], seconds, setup


def train_run(model_dir: Path, kernel: str, layout: str, data, batches, dtype):
    import torch

    from pipeline.logprobs.losses import PairLogps, sigmoid_loss
    from pipeline.logprobs.response import PairOptions, pair_token_logps

    model = load(model_dir, kernel, dtype).train()
    prompts, chosens, rejecteds = data

    def step(index):
        picked = [prompts[i] for i in index], [chosens[i] for i in index], [rejecteds[i] for i in index]
        chosen, rejected = pair_token_logps(model, *picked, PairOptions(device=DEVICE, packing=layout)).sums()
        zeros = torch.zeros_like(chosen)
        loss = sigmoid_loss(PairLogps(chosen, rejected, zeros, zeros), 0.1).mean()
        loss.backward()
        return loss

    started = time.perf_counter()
    step(batches[0])
    first = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]).cpu()
    model.zero_grad(set_to_none=True)
    for index in batches[1:3]:  # warm-up: compilation for the other shapes
        step(index)
        model.zero_grad(set_to_none=True)
    sync()
    setup = time.perf_counter() - started
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for index in batches[3:]:
        step(index)
        model.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return first, seconds, setup, peak


def exactness(model_dir: Path, data, rows: int, report: dict) -> None:
    """float32 kernel x layout against float64 eager padded, on the first ``rows`` pairs."""
    import torch

    from pipeline.logprobs.response import PairOptions, pair_token_logps

    picked = [column[:rows] for column in data]
    with torch.no_grad():
        model = load(model_dir, "eager", torch.float64).eval()
        reference = pair_token_logps(model, *picked, PairOptions(device=DEVICE, packing="none")).values.cpu()
        del model
        print(f"\nexactness, float32 against float64 eager padded ({rows} pairs, {reference.numel()} tokens):")
        for kernel in ("sdpa", "flex_attention", "eager"):
            model = load(model_dir, kernel, torch.float32).eval()
            for layout in LAYOUTS:
                values = pair_token_logps(model, *picked, PairOptions(device=DEVICE, packing=layout)).values.double().cpu()
                diff = float((values - reference).abs().max())
                report["exactness"].append({"kernel": kernel, "layout": layout, "token_max_abs_diff": diff})
                print(f"  {kernel:<16}{layout:<6} max |diff| per token {diff:.2e}")
            del model


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, "gpu_packing.json", gpu=True)
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu_bundle")
    parser.add_argument("--shapes", default="smollm2-135m,llama-1b")
    parser.add_argument("--kernels", default="sdpa,flex_attention")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens-per-batch", type=int, default=16384)
    parser.add_argument("--micro", type=int, default=8, help="pairs per training micro-batch")
    parser.add_argument("--steps", type=int, default=12, help="training micro-batches (3 are warm-up)")
    parser.add_argument("--exact-rows", type=int, default=64)
    parser.add_argument("--eager", action="store_true", help="also eager attention on the small shape")
    parser.add_argument("--rows", type=int, help="only the first N pairs")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    return parser.parse_args()


@dataclasses.dataclass
class Bench:
    """What every part reads: the options, the pairs' token ids (prompts, chosens, rejecteds), each
    pair's real tokens, the training micro-batches (pair indices), and the report written as JSON."""

    args: argparse.Namespace
    data: tuple
    real: list[int]
    batches: list[list[int]]
    report: dict

    def save(self) -> None:
        save_report(self.args.out, self.report)


def load_bench(args: argparse.Namespace) -> Bench:
    import pyarrow.parquet as pq
    import torch

    table = pq.read_table(args.bundle / "examples.parquet").to_pydict()
    data = tuple(table[k][: args.rows] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    real = [len(p) + len(c) + len(r) for p, c, r in zip(*data)]
    rng = random.Random(0)
    batches = [rng.sample(range(len(real)), args.micro) for _ in range(args.steps)]
    report = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "rows": len(real),
              "real_tokens": sum(real), "dtype": args.dtype, "tokens_per_batch": args.tokens_per_batch,
              "micro": args.micro, "scoring": [], "training": [], "exactness": []}
    return Bench(args, data, real, batches, report)


def score_shape(bench: Bench, shape: str, model_dir: Path, kernels: list[str]) -> None:
    """Scoring tokens/s and max |diff| per token against the first (padded sdpa) run, per kernel x layout."""
    args, real = bench.args, bench.real
    print(f"{'scoring':<10}{'kernel':<16}{'layout':<7}{'tok/s':>10}{'setup s':>9}{'max|diff|':>11}")
    base = None
    for kernel in kernels:
        for layout in LAYOUTS:
            try:
                values, seconds, setup = score_run(model_dir, kernel, args.dtype, layout, bench.data,
                                                   args.tokens_per_batch)
            except Exception as exc:  # report and go on
                print(f"  scoring {kernel}/{layout} failed: {exc!r}", file=sys.stderr)
                continue
            base = values if base is None else base
            diff = float(max(np.abs(a - b).max() for a, b in zip(values, base) if len(a)))
            row = {"shape": shape, "kernel": kernel, "layout": layout, "seconds": seconds, "setup_s": setup,
                   "tokens_per_s": sum(real) / seconds, "token_max_abs_diff_vs_sdpa_none": diff}
            bench.report["scoring"].append(row)
            print(f"{'':<10}{kernel:<16}{layout:<7}{row['tokens_per_s']:>10.0f}{setup:>9.1f}{diff:>11.2e}")
            bench.save()


def train_shape(bench: Bench, shape: str, model_dir: Path, kernels: list[str]) -> None:
    """Training tokens/s, peak memory and the first batch's relative gradient difference against the
    first (padded sdpa) run, per kernel x layout."""
    import torch

    dtype = getattr(torch, bench.args.dtype)
    timed = sum(bench.real[i] for index in bench.batches[3:] for i in index)
    print(f"{'training':<10}{'kernel':<16}{'layout':<7}{'tok/s':>10}{'setup s':>9}{'grad rel':>11}{'peak GiB':>10}")
    first = None
    for kernel in kernels:
        for layout in LAYOUTS:
            try:
                grad, seconds, setup, peak = train_run(model_dir, kernel, layout, bench.data, bench.batches, dtype)
            except Exception as exc:
                print(f"  training {kernel}/{layout} failed: {exc!r}", file=sys.stderr)
                continue
            first = grad if first is None else first
            rel = float((grad - first).norm() / first.norm())
            row = {"shape": shape, "kernel": kernel, "layout": layout, "seconds": seconds, "setup_s": setup,
                   "tokens_per_s": timed / seconds, "peak_gib": peak, "grad_rel_diff_vs_sdpa_none": rel}
            bench.report["training"].append(row)
            print(f"{'':<10}{kernel:<16}{layout:<7}{row['tokens_per_s']:>10.0f}{setup:>9.1f}{rel:>11.2e}{peak:>10.2f}")
            bench.save()


def main() -> int:
    args = parse_args()
    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run this on the lent GPU machine", file=sys.stderr)
        return 1
    bench = load_bench(args)
    for shape in args.shapes.split(","):
        model_dir = build_model(args.bundle, None, Path(tempfile.mkdtemp()) / "model", shape)
        kernels = args.kernels.split(",") + (["eager"] if shape == "smollm2-135m" and args.eager else [])
        print(f"\n{bench.report['device']}, {shape} ({args.dtype}), {len(bench.real)} HH pairs, "
              f"{sum(bench.real)} real tokens")
        score_shape(bench, shape, model_dir, kernels)
        train_shape(bench, shape, model_dir, kernels)
        if shape == "smollm2-135m" and args.exact_rows:
            try:
                exactness(model_dir, bench.data, args.exact_rows, bench.report)
            except Exception as exc:
                print(f"  exactness failed: {exc!r}", file=sys.stderr)
            bench.save()
    return finish(args.out, bench.report)


if __name__ == "__main__":
    sys.exit(main())
