"""GPU train check: the demo's prepare -> score -> train on CUDA, in each training mode.

This calls the stage functions directly (no Prefect, no polars: the lent GPU machine has neither)
on the built-in demo assets with the demo's settings (pipeline.models.assets.DEMO_TRAIN, cmd_demo's
tokenize limits and eval split), once per mode, each in its own storage folder, and prints per
mode: wall seconds of the train stage, seconds per optimizer step (median of metrics.jsonl's
per-step times), first and final eval reward accuracy, the step-0 check's max mean per-token
|diff| against the reference cache, and peak CUDA memory (the largest over the ranks).

Modes (--modes): float32; bfloat16 (model.dtype bfloat16: bf16-mixed autocast); bf16 (pure);
bf16-lora (pure bf16 + LoRA r 8); and with more than one visible GPU, ddp and fsdp (pure bf16,
one process per GPU under torchrun, this script as the worker: the path a user's own torchrun
takes).

  GPU:   PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_train_check.py
  here:  PYTHONPATH=. .venv/bin/python bench/gpu_train_check.py --device cpu --max-steps 4 --nproc 2
         (a dry run of the same code paths on CPU; ddp/fsdp with gloo)

Writes JSON to $OUT/gpu_train_check.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _common import bench_parser, finish

MODES = {  # name: (model.dtype, train overrides, distributed)
    "float32": ("float32", {}, None),
    "bfloat16": ("bfloat16", {}, None),
    "bf16": ("float32", {"precision": "bf16"}, None),
    "bf16-lora": ("float32", {"precision": "bf16", "learning_rate": 1e-2,
                              "peft": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}}, None),
    "ddp": ("float32", {"precision": "bf16"}, "ddp"),
    "fsdp": ("float32", {"precision": "bf16"}, "fsdp"),
}


def mode_config(mode: str, assets: dict, root: Path, device: str, max_steps: int | None, nproc: int) -> dict:
    from pipeline.models.assets import DEMO_TRAIN

    dtype, overrides, engine = MODES[mode]
    train_cfg = {**DEMO_TRAIN, **overrides, "device": device, "run_name": f"demo-{mode}"}
    if engine:  # the same effective batch (16 pairs) split over the processes
        train_cfg.update(distributed=engine, nproc_per_node=nproc,
                         per_device_train_batch_size=DEMO_TRAIN["per_device_train_batch_size"] // nproc)
    if max_steps is not None:
        train_cfg["max_steps"] = max_steps
    return {
        "storage": str(root / mode),
        "data": {"path": str(assets["data"]), "eval_fraction": 0.1},
        "model": {"path": str(assets["model"]), "dtype": dtype},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "score": {"backend": "transformers", "device": device},
        "train": train_cfg,
    }


def worker(config_path: Path) -> int:
    """One torchrun rank: train, then write this rank's peak CUDA memory beside the config."""
    import torch

    from pipeline.config.load import config_from_dict
    from pipeline.train.stage import train

    config = json.loads(config_path.read_text())
    train(config_from_dict(config), show_progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    (config_path.parent / f"peak-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(peak))
    return 0


def _prepare_and_score(cfg, row: dict) -> None:
    """The prepare and score stages, their seconds and counts into ``row``."""
    from pipeline.prepare.stage import prepare
    from pipeline.score.stage import score

    started = time.perf_counter()
    prepared = prepare(cfg, show_progress=False)
    row["prepare_s"] = time.perf_counter() - started
    row["prepare_counts"] = {k: prepared.manifest["counts"][k] for k in ("kept", "rejected", "train", "eval")}

    started = time.perf_counter()
    scored = score(cfg, show_progress=False)
    row["score_s"] = time.perf_counter() - started
    row["score_backend"] = scored.stats.get("backend")


def _train(mode: str, config: dict, cfg, root: Path, row: dict):
    """The train stage (under torchrun for ddp/fsdp): its seconds and peak CUDA memory into
    ``row``; returns the finished run."""
    import torch

    from pipeline.train.launch import torchrun
    from pipeline.train.stage import finished_run, train

    cuda = config["train"]["device"] == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if MODES[mode][2] is not None:
        config_path = root / mode / "worker.json"
        config_path.write_text(json.dumps(config))
        torchrun([str(Path(__file__).resolve()), "--worker", str(config_path)], config["train"]["nproc_per_node"],
                 root / mode / "logs")
        result = finished_run(cfg)
        peaks = [json.loads(p.read_text()) for p in (root / mode).glob("peak-rank*.json")]
        row["peak_cuda_mib"] = max(peaks) if cuda and peaks else None
    else:
        result = train(cfg, show_progress=False)
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    if cuda:
        torch.cuda.synchronize()
    row["train_s"] = time.perf_counter() - started
    return result


def _run_figures(result) -> dict:
    """Steps, seconds per step, eval accuracies and losses, and the step-0 check of a finished run."""
    from pipeline.storage import paths

    metrics = [json.loads(line) for line in (result.run_dir / paths.METRICS).read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "loss" in m and "eval/loss" not in m]
    step_seconds = [m["seconds"] for m in steps]
    summary = result.summary
    first, final = summary.get("first_eval") or {}, summary.get("final_eval") or {}
    step0 = next((m for m in metrics if "step0/max_mean_token_diff" in m), {})
    return dict(
        steps=len(steps),
        s_per_step=statistics.median(step_seconds) if step_seconds else float("nan"),
        first_step_s=step_seconds[0] if step_seconds else float("nan"),
        first_eval_acc=first.get("eval/rewards/accuracies"),
        final_eval_acc=final.get("eval/rewards/accuracies"),
        final_eval_loss=final.get("eval/loss"),
        final_train_loss=steps[-1]["loss"] if steps else None,
        step0_diff=step0.get("step0/max_mean_token_diff"),
        step0_tolerance=step0.get("step0/tolerance"),
        train_examples=summary.get("train_examples"),
        eval_examples=summary.get("eval_examples"),
        run_dir=str(result.run_dir),
    )


def run_mode(mode: str, assets: dict, root: Path, device: str, max_steps: int | None, nproc: int) -> dict:
    import torch

    from pipeline.config.load import config_from_dict

    config = mode_config(mode, assets, root, device, max_steps, nproc)
    cfg = config_from_dict(config)
    row: dict = {"dtype": mode}
    _prepare_and_score(cfg, row)
    result = _train(mode, config, cfg, root, row)
    row.update(_run_figures(result))
    del result
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, "gpu_train_check.json", gpu=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--nproc", type=int, help="processes of ddp/fsdp (default: the visible GPUs; "
                        "those modes are skipped with fewer than 2)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, help="override DEMO_TRAIN's max_steps (dry runs)")
    parser.add_argument("--root", type=Path, help="working folder (default: a fresh temporary one)")
    return parser.parse_args()


def run_modes(args: argparse.Namespace, report: dict) -> None:
    """Every mode of --modes on the demo assets, rows (or failures, skips) into ``report``."""
    import torch

    from pipeline.models.assets import build_demo_assets

    root = args.root or Path(tempfile.mkdtemp(prefix="gpu-train-check-"))
    assets = build_demo_assets(root / "demo")
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 1)
    for dtype in args.modes.split(","):
        if MODES[dtype][2] and nproc < 2:
            report["skipped"] = report.get("skipped", []) + [f"{dtype}: one device (--nproc)"]
            continue
        print(f"\n=== {dtype} ===", file=sys.stderr)
        try:
            report["results"].append(run_mode(dtype, assets, root, args.device, args.max_steps, nproc))
        except Exception as exc:  # report and go on: one failing dtype must not hide the other
            traceback.print_exc()
            report["failures"][dtype] = repr(exc)
    report["modules_absent"] = {m: m not in sys.modules for m in ("polars", "prefect", "vllm", "flows")}


def print_table(report: dict) -> None:
    print(f"\n{report['device']}: demo train, torch {report['torch']}")
    print(f"{'dtype':<10}{'steps':>6}{'train s':>9}{'s/step':>9}{'1st step s':>11}{'eval acc 0':>11}"
          f"{'eval acc end':>13}{'step0 diff':>12}{'peak MiB':>10}{'score s':>9}")
    for r in report["results"]:
        print(f"{r['dtype']:<10}{r['steps']:>6}{r['train_s']:>9.2f}{r['s_per_step']:>9.4f}{r['first_step_s']:>11.3f}"
              f"{_fmt(r['first_eval_acc'], '.3f'):>11}{_fmt(r['final_eval_acc'], '.3f'):>13}"
              f"{_fmt(r['step0_diff'], '.2e'):>12}{_fmt(r['peak_cuda_mib'], '.1f'):>10}{r['score_s']:>9.2f}")
    for dtype, error in report["failures"].items():
        print(f"{dtype}: FAILED {error}")
    print(f"modules never imported: {report['modules_absent']}; skipped: {report.get('skipped', [])}")


def main() -> int:
    args = parse_args()
    if args.worker:
        return worker(args.worker)

    import logging

    import torch

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run this on the lent GPU machine, or pass --device cpu", file=sys.stderr)
        return 1
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    report = {"device": device_name, "torch": torch.__version__, "results": [], "failures": {}}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    run_modes(args, report)
    print_table(report)
    return finish(args.out, report, failed=bool(report["failures"]))


if __name__ == "__main__":
    sys.exit(main())
