"""Scoring throughput: our transformers backend vs a naive baseline, SmolLM2-135M on an HH slice.

    .venv/bin/python bench/score_bench.py [--rows 48] [--out bench/results/score.json]

Same sequences, same model, same process:
- ours: TransformersScorer (sorted by length, token-budget batches, LM head and float32
  log-softmax only at response positions), with and without prefix sharing (each prompt run
  once for both of its responses);
- naive: batches of 8 sequences in dataset order, right-padded, full-vocabulary float32
  log-softmax over every position, then gather.
Reports tokens/s (prompt + response tokens of every sequence scored, whether or not a shared
prompt is computed once), the ratio, the agreement of the
two (max |diff|), and the share of this machine's measured float32 matmul FLOP/s that scoring
reaches: 2 x params x tokens / time (the issue's measure) and, more strictly, the FLOPs the
work needs (2 x non-embedding params x tokens + 2 x head params x scored positions).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from _common import bench_parser, finish, hh_slice


def matmul_ceiling(seconds: float = 3.0) -> float:
    """Best float32 matmul FLOP/s over a few shapes (this machine's practical ceiling)."""
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def naive_score(model, prompts, responses, batch_size=8):
    out = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            ps, rs = prompts[start : start + batch_size], responses[start : start + batch_size]
            seqs = [p + r for p, r in zip(ps, rs)]
            width = max(map(len, seqs))
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for i, (p, r) in enumerate(zip(ps, rs)):
                pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
                out.append(logps[i, pos, torch.tensor(r)].numpy())
    return out


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, "score.json")
    parser.add_argument("--rows", type=int, default=48, help="HH examples (2 sequences each)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--budgets", default="1024,2048,4096", help="tokens_per_batch values to try")
    return parser.parse_args()


@dataclasses.dataclass
class Workload:
    """The prepared HH slice: its examples, and the sequences in the naive order (each prompt
    twice: chosen, rejected) with their token counts."""

    examples: list[dict]
    prompts: list[list[int]]
    responses: list[list[int]]
    tokens: int
    response_tokens: int

    @classmethod
    def of(cls, examples: list[dict]) -> "Workload":
        prompts = [e["prompt_ids"] for e in examples for _ in (0, 1)]
        responses = [e[k] for e in examples for k in ("chosen_ids", "rejected_ids")]
        tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
        return cls(examples, prompts, responses, tokens, sum(map(len, responses)))


def prepare_slice(args: argparse.Namespace):
    """Prepare ``--rows`` HH examples with SmolLM2's tokenizer; returns the config and the examples."""
    from pipeline.config.load import config_from_dict
    from pipeline.models.assets import smollm2_folder
    from pipeline.prepare.stage import prepare

    model_dir = smollm2_folder()
    with tempfile.TemporaryDirectory() as tmp:
        slice_path = hh_slice(tmp, args.rows)
        raw = {
            "storage": tmp,
            "data": {"path": str(slice_path)},
            "model": {"path": str(model_dir)},
            "tokenize": {"max_length": args.max_length, "max_prompt_length": args.max_length // 2},
        }
        cfg = config_from_dict(raw)
        examples = pq.read_table(prepare(cfg, show_progress=False).output_dir / "examples.parquet").to_pylist()
    return cfg, examples


def time_ours(cfg, examples: list[dict], budgets: str):
    """TransformersScorer per token budget with prefix sharing, and the first budget without;
    returns {method: {seconds, values}} and the scorer (its model serves the naive baseline)."""
    from pipeline.logprobs.backends.transformers_backend import TransformersScorer

    ex_prompts = [e["prompt_ids"] for e in examples]
    ex_chosen = [e["chosen_ids"] for e in examples]
    ex_rejected = [e["rejected_ids"] for e in examples]
    results = {}
    scorer = None
    variants = [(int(b), True) for b in budgets.split(",")] + [(int(budgets.split(",")[0]), False)]
    for budget, shared in variants:
        cfg.score.tokens_per_batch = budget
        if scorer is None:
            scorer = TransformersScorer(cfg)
        scorer.tokens_per_batch, scorer.prefix_sharing = budget, shared
        scorer.score_pairs(ex_prompts[:4], ex_chosen[:4], ex_rejected[:4])  # warm-up
        start = time.perf_counter()
        chosen, rejected = scorer.score_pairs(ex_prompts, ex_chosen, ex_rejected)
        seconds = time.perf_counter() - start
        values = [v for pair in zip(chosen, rejected) for v in pair]  # the naive order
        results[f"ours_{'shared' if shared else 'separate'}_tpb{budget}"] = {"seconds": seconds, "values": values}
    return results, scorer


def result_rows(model, results: dict, work: Workload, ceiling: float) -> list[dict]:
    """Per method: seconds, tokens/s, speed-up over naive, shares of the matmul ceiling, drift."""
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    non_embedding = params - embed if model.config.tie_word_embeddings else params - embed - head
    needed_flops = 2 * non_embedding * work.tokens + 2 * head * work.response_tokens
    naive = results["naive_b8"]
    rows = []
    for name, r in results.items():
        diff = max(float(np.abs(a - b).max()) for a, b in zip(r["values"], naive["values"]))
        rows.append(
            {
                "method": name,
                "seconds": round(r["seconds"], 3),
                "tokens_per_s": round(work.tokens / r["seconds"], 1),
                "vs_naive": round(naive["seconds"] / r["seconds"], 2),
                "matmul_share_2PT": round(2 * params * work.tokens / r["seconds"] / ceiling, 3),
                "matmul_share_needed": round(needed_flops / r["seconds"] / ceiling, 3),
                "max_abs_diff_vs_naive": diff,
            }
        )
    return rows


def print_table(params: int, work: Workload, ceiling: float, rows: list[dict]) -> None:
    print(f"\nSmolLM2-135M ({params / 1e6:.1f}M params), {len(work.examples)} HH rows = {len(work.prompts)} "
          f"sequences, {work.tokens} tokens ({work.response_tokens} scored); fp32 matmul ceiling "
          f"{ceiling / 1e9:.1f} GFLOP/s on {os.cpu_count()} CPUs, {torch.get_num_threads()} threads\n")
    header = f"{'method':<26}{'seconds':>9}{'tok/s':>9}{'x naive':>9}{'2PT/ceil':>10}{'needed/ceil':>12}{'max|diff|':>11}"
    print(header)
    for row in rows:
        print(f"{row['method']:<26}{row['seconds']:>9.2f}{row['tokens_per_s']:>9.0f}{row['vs_naive']:>9.2f}"
              f"{row['matmul_share_2PT']:>10.1%}{row['matmul_share_needed']:>12.1%}{row['max_abs_diff_vs_naive']:>11.1e}")


def main() -> int:
    args = parse_args()
    cfg, examples = prepare_slice(args)
    work = Workload.of(examples)
    ceiling = matmul_ceiling()
    results, scorer = time_ours(cfg, examples, args.budgets)
    model = scorer.model
    naive_score(model, work.prompts[:8], work.responses[:8])
    start = time.perf_counter()
    naive = naive_score(model, work.prompts, work.responses)
    results["naive_b8"] = {"seconds": time.perf_counter() - start, "values": naive}
    rows = result_rows(model, results, work, ceiling)
    params = sum(p.numel() for p in model.parameters())
    print_table(params, work, ceiling, rows)
    report = {
        "bench": "score",
        "model": "SmolLM2-135M-Instruct",
        "params": params,
        "rows": len(examples),
        "sequences": len(work.prompts),
        "tokens": work.tokens,
        "response_tokens": work.response_tokens,
        "matmul_ceiling_flops": ceiling,
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform()},
        "results": rows,
    }
    return finish(args.out, report)


if __name__ == "__main__":
    sys.exit(main())
