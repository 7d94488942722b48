"""GPU check: score one HH slice through vLLM and transformers on a GPU, compare and time them.

Two steps, because the lent GPU machine reaches no network and takes at most 64 MiB of files:

  here:       .venv/bin/python bench/gpu_check.py --make-bundle .gpu_bundle [--rows 256]
              (prepares the HH slice with SmolLM2's tokenizer; writes examples.parquet, SmolLM2's
              config and tokenizer files, ~4 MB; add `/.gpu_bundle/` to .git/info/exclude)
  GPU:        PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_check.py --bundle .gpu_bundle
              (device run with carry [".gpu_bundle"]; finishes in a few minutes)

On the GPU the model is SmolLM2-135M's architecture. Its weights (540 MB in float32) cannot
travel, so unless ``--weights DIR`` points at a folder with them, the model is built from the
config with a seeded random init: the backends' agreement and their speed are still measured on
the real shapes and token ids. Prints per-token and per-sequence max/mean |diff| and tokens/s of
each backend and dtype; writes JSON to $OUT/gpu_check.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ROOT, hh_slice  # noqa: E402
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_bundle(bundle: Path, rows: int) -> None:
    import pyarrow.parquet as pq

    from pipeline.assets import smollm2_folder
    from pipeline.config import config_from_dict
    from pipeline.prepare import prepare

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


def build_model(bundle: Path, weights: Path | None, target: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if weights is not None:
        return weights
    config = AutoConfig.from_pretrained(str(bundle))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (bundle / name).exists():
            shutil.copy(bundle / name, target / name)
    return target


def run_backend(name: str, model_dir: Path, dtype: str, data, max_sequence: int):
    from pipeline.config import config_from_dict

    cfg = config_from_dict({"data": {"path": "unused"}, "model": {"path": str(model_dir), "dtype": dtype},
                            "score": {"backend": name, "tokens_per_batch": 65536, "gpu_memory_utilization": 0.5}})
    if name == "vllm":
        from pipeline.scorers.vllm import VllmScorer

        scorer = VllmScorer(cfg, max_sequence)
    else:
        from pipeline.scorers.transformers_backend import TransformersScorer

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-bundle", type=Path)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu_bundle")
    parser.add_argument("--weights", type=Path, help="a SmolLM2 folder with weights, if one is there")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results")) / "gpu_check.json")
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
    model_dir = build_model(args.bundle, args.weights, Path(tempfile.mkdtemp()) / "model")
    runs = {}
    backends = ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    for dtype in ("float32", "bfloat16"):
        for backend in backends:
            try:
                values, seconds = run_backend(backend, model_dir, dtype, data, max_sequence)
            except Exception as exc:  # report and go on: one broken backend must not hide the rest
                print(f"{backend}/{dtype} failed: {exc!r}", file=sys.stderr)
                continue
            runs[(backend, dtype)] = {"values": values, "seconds": seconds}
    reference = runs.get(("transformers", "float32"))
    report = {"device": torch.cuda.get_device_name(0), "rows": len(data[0]), "tokens": tokens,
              "random_weights": args.weights is None, "vllm_installed": "vllm" in backends, "results": []}
    print(f"\n{report['device']}: {len(data[0])} HH rows, {tokens} sequence tokens; "
          f"{'random' if args.weights is None else 'real'} SmolLM2-135M weights")
    print(f"{'backend/dtype':<24}{'tok/s':>10}{'tok maxdiff':>13}{'tok meandiff':>13}{'seq maxdiff':>13}{'seq meandiff':>13}")
    for (backend, dtype), run in runs.items():
        row = {"backend": backend, "dtype": dtype, "seconds": run["seconds"], "tokens_per_s": tokens / run["seconds"]}
        if reference is not None:
            tok = np.concatenate([np.abs(a - b) for a, b in zip(run["values"], reference["values"])])
            seq = np.array([abs(float(a.sum(dtype=np.float64) - b.sum(dtype=np.float64)))
                            for a, b in zip(run["values"], reference["values"])])
            row.update(token_max=float(tok.max()), token_mean=float(tok.mean()), seq_max=float(seq.max()), seq_mean=float(seq.mean()))
        report["results"].append(row)
        print(f"{backend + '/' + dtype:<24}{row['tokens_per_s']:>10.0f}{row.get('token_max', float('nan')):>13.2e}"
              f"{row.get('token_mean', float('nan')):>13.2e}{row.get('seq_max', float('nan')):>13.2e}{row.get('seq_mean', float('nan')):>13.2e}")
    if "vllm" not in backends:
        print("vLLM is not installed on this machine: only the transformers backend was measured")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"(differences are against transformers/float32 on the same GPU)\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
