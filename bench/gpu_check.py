"""GPU check: score one HH slice through vLLM and transformers on a GPU, compare and time them.

Two steps, because the lent GPU machine reaches no network and takes at most 64 MiB of files:

  here:       .venv/bin/python bench/gpu_check.py --make-bundle .gpu_bundle [--rows 256]
              (prepares the HH slice with SmolLM2's tokenizer; writes examples.parquet, SmolLM2's
              config and tokenizer files, ~4 MB; add `/.gpu_bundle/` to .git/info/exclude)
  GPU:        PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_check.py --bundle .gpu_bundle
              (device run with carry [".gpu_bundle"]; finishes in a few minutes)

Model shapes (--shapes): SmolLM2-135M's architecture, and a ~1B Llama (hidden 2048, 16 layers,
GQA 32/8 heads) with SmolLM2's vocabulary, for vLLM's speed-up over transformers where it counts
(the goal: 10x the tokens/s on the same card). SmolLM2's weights (540 MB in float32) cannot
travel, so unless ``--weights DIR`` points at a folder with them, the model is built from the
config with a seeded random init: the backends' agreement and their speed are still measured on
the real shapes and token ids. Prints per-token and per-sequence max/mean |diff| and tokens/s of
each backend and dtype; writes JSON to $OUT/gpu_check.json (or --out).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT, bench_parser, finish, hh_slice

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_bundle(bundle: Path, rows: int) -> None:
    import pyarrow.parquet as pq

    from pipeline.config.load import config_from_dict
    from pipeline.models.assets import smollm2_folder
    from pipeline.prepare.stage import prepare

    model_dir = smollm2_folder()
    bundle.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = hh_slice(tmp, rows)
        cfg = config_from_dict({"storage": tmp, "data": {"path": str(data)}, "model": {"path": str(model_dir)},
                                "tokenize": {"max_length": 1024, "max_prompt_length": 768}})
        result = prepare(cfg, show_progress=False)
        table = pq.read_table(result.output_dir / "examples.parquet",
                              columns=["id", "prompt_ids", "chosen_ids", "rejected_ids"])
        pq.write_table(table, bundle / "examples.parquet", compression="zstd")
        (bundle / "max_sequence.txt").write_text(str(result.manifest["tokens"]["max_sequence"]))
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, bundle / name)
    print(f"bundle written to {bundle} ({sum(f.stat().st_size for f in bundle.iterdir()) / 1e6:.1f} MB)")


SHAPES = {  # name: overrides of SmolLM2's config (its vocabulary and tokenizer are kept)
    "smollm2-135m": {},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True},
}


def build_model(bundle: Path, weights: Path | None, target: Path, shape: str = "smollm2-135m") -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if weights is not None and shape == "smollm2-135m":
        return weights
    config = AutoConfig.from_pretrained(str(bundle))
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (bundle / name).exists():
            shutil.copy(bundle / name, target / name)
    return target


def run_backend(name: str, model_dir: Path, dtype: str, data, max_sequence: int):
    from pipeline.config.load import config_from_dict

    cfg = config_from_dict({"data": {"path": "unused"}, "model": {"path": str(model_dir), "dtype": dtype},
                            "score": {"backend": name, "tokens_per_batch": 65536, "gpu_memory_utilization": 0.5}})
    if name == "vllm":
        from pipeline.logprobs.backends.vllm import VllmScorer

        scorer = VllmScorer(cfg, max_sequence)
    else:
        from pipeline.logprobs.backends.transformers_backend import TransformersScorer

        scorer = TransformersScorer(cfg)
    prompts, chosens, rejecteds = data
    scorer.score_pairs(prompts[:8], chosens[:8], rejecteds[:8])  # warm-up (compilation, graphs)
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    chosen, rejected = scorer.score_pairs(prompts, chosens, rejecteds)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del scorer
    torch.cuda.empty_cache()
    return chosen + rejected, seconds


def main() -> int:
    parser = bench_parser(__doc__, "gpu_check.json", gpu=True)
    parser.add_argument("--make-bundle", type=Path)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu_bundle")
    parser.add_argument("--weights", type=Path, help="a SmolLM2 folder with weights, if one is there")
    parser.add_argument("--shapes", default="smollm2-135m,llama-1b",
                        help=f"model shapes (random weights but SmolLM2's with --weights): {', '.join(SHAPES)}")
    args = parser.parse_args()
    if args.make_bundle:
        make_bundle(args.make_bundle, args.rows)
        return 0

    import importlib.util

    import pyarrow.parquet as pq
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: run this on the lent GPU machine", file=sys.stderr)
        return 1
    table = pq.read_table(args.bundle / "examples.parquet").to_pydict()
    data = (table["prompt_ids"], table["chosen_ids"], table["rejected_ids"])
    max_sequence = int((args.bundle / "max_sequence.txt").read_text())
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(*data))
    backends = ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    report = {"device": torch.cuda.get_device_name(0), "rows": len(data[0]), "tokens": tokens,
              "random_weights": args.weights is None, "vllm_installed": "vllm" in backends, "results": []}
    for shape in args.shapes.split(","):
        model_dir = build_model(args.bundle, args.weights, Path(tempfile.mkdtemp()) / "model", shape)
        report_shape(report, shape, backends, model_dir, Rows(data, max_sequence, tokens))
    if "vllm" not in backends:
        print("vLLM is not installed on this machine: only the transformers backend was measured")
    print("(differences are against transformers/float32 on the same GPU and shape)")
    return finish(args.out, report)


@dataclasses.dataclass(frozen=True)
class Rows:
    """The bundle's HH slice: (prompts, chosens, rejecteds) token ids, its longest sequence, and
    its sequence tokens (each pair's prompt twice)."""

    data: tuple
    max_sequence: int
    tokens: int


def report_shape(report: dict, shape: str, backends: list[str], model_dir: Path, rows: Rows) -> None:
    """Run every backend x dtype on one model shape; rows (tokens/s, drift against
    transformers/float32, vLLM's speed-up over transformers in the same dtype) into ``report``."""
    data, max_sequence, tokens = rows.data, rows.max_sequence, rows.tokens
    runs = {}
    for dtype in ("float32", "bfloat16"):
        for backend in backends:
            try:
                values, seconds = run_backend(backend, model_dir, dtype, data, max_sequence)
            except Exception as exc:  # report and go on: one broken backend must not hide the rest
                print(f"{shape} {backend}/{dtype} failed: {exc!r}", file=sys.stderr)
                continue
            runs[(backend, dtype)] = {"values": values, "seconds": seconds}
    reference = runs.get(("transformers", "float32"))
    print(f"\n{report['device']}: {len(data[0])} HH rows, {tokens} sequence tokens; shape {shape}, "
          f"{'random' if report['random_weights'] or shape != 'smollm2-135m' else 'real'} weights")
    print(f"{'backend/dtype':<24}{'tok/s':>10}{'tok maxdiff':>13}{'tok meandiff':>13}{'seq maxdiff':>13}{'seq meandiff':>13}")
    for (backend, dtype), run in runs.items():
        row = {"shape": shape, "backend": backend, "dtype": dtype, "seconds": run["seconds"],
               "tokens_per_s": tokens / run["seconds"]}
        baseline = runs.get(("transformers", dtype))
        if backend == "vllm" and baseline is not None:
            row["speedup_over_transformers"] = baseline["seconds"] / run["seconds"]
        if reference is not None:
            tok = np.concatenate([np.abs(a - b) for a, b in zip(run["values"], reference["values"])])
            seq = np.array([abs(float(a.sum(dtype=np.float64) - b.sum(dtype=np.float64)))
                            for a, b in zip(run["values"], reference["values"])])
            row.update(token_max=float(tok.max()), token_mean=float(tok.mean()), seq_max=float(seq.max()), seq_mean=float(seq.mean()))
        report["results"].append(row)
        print(f"{backend + '/' + dtype:<24}{row['tokens_per_s']:>10.0f}{row.get('token_max', float('nan')):>13.2e}"
              f"{row.get('token_mean', float('nan')):>13.2e}{row.get('seq_max', float('nan')):>13.2e}{row.get('seq_mean', float('nan')):>13.2e}")
        if "speedup_over_transformers" in row:
            print(f"{'':<24}vLLM {row['speedup_over_transformers']:.1f}x the tokens/s of transformers ({dtype})")


if __name__ == "__main__":
    sys.exit(main())
