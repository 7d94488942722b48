"""Peak memory of a training step per precision mode (train.precision), full fine-tuning.

    PYTHONPATH=. .venv/bin/python bench/memory_bench.py [--steps 5] [--batch-size 4] [--max-length 512]

CPU: SmolLM2-135M on an HH slice, through the trainer's own ``Trainer.train_step`` (the reference
log-probs are zeros instead of a score cache: they change no memory). Each mode runs in its own
process; a thread samples the RSS (/proc/self/statm) every 2 ms, so the peak of each step is its
own. Also reported: the training state in bytes per parameter, counted from the tensors (weights +
gradients + AdamW states, just before zero_grad of the first step), and the same run without the
malloc_trim that ``Trainer.train_step`` does on CPU (``--no-trim`` rows: what RSS does without it).

GPU (only when CUDA is available): random-weight Llama models of real shapes (1B and 8B configs,
built from LlamaConfig, no download) on one GPU, gradient checkpointing on, one synthetic pair of
1024 tokens per step, ``torch.cuda.max_memory_allocated`` per mode; a mode that does not fit is
reported as OOM. The target: 8B full fine-tuning in pure bf16 on one 80 GB GPU.

LoRA rows (GPU): ``--lora-modes`` (default bf16): the same models with LoRA (r 16, all linear
layers) in that precision, only the adapters trained. Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

from _common import ROOT, bench_parser, finish, hh_slice

MODES = ("float32", "bf16-mixed", "bf16")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Llama shapes (Llama 3.2 1B, Llama 3.1 8B); weights are random: memory depends on shapes only.
LLAMA_SHAPES = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True),  # --gpu-dry-run
}


class RssSampler:
    """Max RSS since the last ``reset``, sampled every 2 ms by a thread (torch ops release the GIL)."""

    def __init__(self):
        self.peak = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def reset(self) -> int:
        peak, self.peak = max(self.peak, self.rss()), self.rss()
        return peak


def _config(storage: str, model_path: str, data_path: str, mode: str, args: argparse.Namespace):
    """The CPU rows' config; ``args`` gives batch_size, steps and max_length."""
    from pipeline.config.load import config_from_dict

    batch, steps, max_length = args.batch_size, args.steps, args.max_length
    return config_from_dict({
        "storage": storage, "data": {"path": data_path, "eval_fraction": 0.0}, "model": {"path": model_path},
        "tokenize": {"max_length": max_length, "max_prompt_length": max_length // 2},
        "train": {"per_device_train_batch_size": batch, "max_steps": steps, "precision": mode, "device": "cpu",
                  "learning_rate": 1e-6, "step0_check": "off"},
    })


def _zero_reference(split, index):
    import torch

    return torch.zeros(len(index), dtype=torch.float64), torch.zeros(len(index), dtype=torch.float64)


def cpu_worker(args) -> dict:
    """One mode, one process: per-step peak RSS of ``Trainer.train_step`` on SmolLM2-135M."""
    import pyarrow.parquet as pq
    import torch

    import pipeline.models.precision as precision
    from pipeline.models.loading import load_causal_lm
    from pipeline.storage import locate, paths
    from pipeline.train.batches import Split
    from pipeline.train.stage import build_trainer

    if args.no_trim:
        precision.release_memory = lambda device: None
    sampler = RssSampler()
    cfg = _config(args.storage, args.model, args.data, args.mode, args)
    table = pq.read_table(locate.find_dataset(cfg) / paths.EXAMPLES)
    n = table.num_rows
    split = Split(table.column("id").to_pylist(), table.column("prompt_ids").to_pylist(),
                  table.column("chosen_ids").to_pylist(), table.column("rejected_ids").to_pylist(),
                  torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
    empty = Split([], [], [], [], torch.zeros(0), torch.zeros(0))
    before_load = RssSampler.rss()
    torch.manual_seed(0)
    policy = load_causal_lm(paths.policy_init(cfg), "cpu").train()
    trainer = build_trainer(cfg, {"train": split, "eval": empty}, policy)
    trainer.reference = _zero_reference
    after_load = RssSampler.rss()
    sampler.reset()
    state = {}
    real_zero_grad = trainer.optimizer.zero_grad

    def zero_grad_after_counting(*a, **k):  # the full state exists just before the first zero_grad
        if not state:
            state.update(precision.state_bytes(trainer.policy, trainer.optimizer))
        return real_zero_grad(*a, **k)

    trainer.optimizer.zero_grad = zero_grad_after_counting
    peaks, losses, seconds, after = [], [], [], []
    for step in range(args.steps):
        record = trainer.run_step(step)
        peaks.append(sampler.reset() / 2**20)
        after.append(RssSampler.rss() / 2**20)
        losses.append(record["loss"])
        seconds.append(record["seconds"])
    total = state["weights"] + state["gradients"] + state["optimizer"]
    return {"mode": args.mode, "trim": not args.no_trim, "peak_rss_mb_per_step": peaks, "rss_mb_after_step": after,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_mb_before_load": before_load / 2**20, "rss_mb_after_load": after_load / 2**20,
            "parameters": state["parameters"], "state_bytes": state, "state_bytes_per_param": total / state["parameters"],
            "losses": losses, "seconds": seconds, "threads": torch.get_num_threads()}


def gpu_worker(args) -> dict:
    """One mode, one process: torch.cuda.max_memory_allocated of full fine-tuning a random-weight
    Llama of real shapes (gradient checkpointing on, one pair of 512 + 256 + 256 tokens per step)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import pipeline.models.precision as precision
    from pipeline.config.load import config_from_dict
    from pipeline.train.batches import Split
    from pipeline.train.stage import build_trainer

    device = "cpu" if args.shape == "tiny" else "cuda"
    lora = args.lora == "yes"
    peft = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"} if lora else None
    cfg = config_from_dict({"data": {"path": "unused"}, "model": {"path": "unused"},
                            "train": {"per_device_train_batch_size": 1, "max_steps": args.steps, "precision": args.mode,
                                      "gradient_checkpointing": True, "learning_rate": 1e-6, "peft": peft}})
    mode = precision.resolve(cfg)
    config = LlamaConfig(**LLAMA_SHAPES[args.shape], max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    gen = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    tokens = lambda k: torch.randint(3, vocab, (k,), generator=gen).tolist()  # noqa: E731
    pairs = args.steps
    split = Split([str(i) for i in range(pairs)], [tokens(512) for _ in range(pairs)], [tokens(256) for _ in range(pairs)],
                  [tokens(256) for _ in range(pairs)], torch.zeros(pairs, dtype=torch.float64),
                  torch.zeros(pairs, dtype=torch.float64))
    empty = Split([], [], [], [], torch.zeros(0), torch.zeros(0))
    out = {"shape": args.shape, "mode": mode + (" + LoRA" if lora else ""), "tokens_per_step": 2 * 512 + 512}
    try:
        with torch.device(device):
            policy = LlamaForCausalLM._from_config(config, dtype=getattr(torch, precision.param_dtype(mode)))
        policy.train()
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out["parameters"] = sum(p.numel() for p in policy.parameters())
        if lora:
            from pipeline.models.adapters import with_lora

            policy.enable_input_require_grads()  # checkpointing with a frozen embedding (peft's advice)
            policy = with_lora(policy, cfg.train.peft)
            out["trained_parameters"] = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        trainer = build_trainer(cfg, {"train": split, "eval": empty}, policy)
        trainer.reference = _zero_reference
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        peaks = []
        for step in range(args.steps):
            record = trainer.run_step(step)
            if device == "cuda":
                peaks.append(torch.cuda.max_memory_allocated() / 2**30)
            out.setdefault("losses", []).append(record["loss"])
            out.setdefault("step_seconds", []).append(record["seconds"])
        out["peak_gib_after_step"] = peaks
        out["peak_gib"] = max(peaks) if peaks else None
        out["peak_bytes_per_param"] = max(peaks) * 2**30 / out["parameters"] if peaks else None
        out["ok"] = True
    except torch.OutOfMemoryError as exc:
        out.update(ok=False, error="OOM: " + str(exc).splitlines()[0][:200])
    return out


def _spawn(argv: list[str], env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if done.returncode:
        sys.stderr.write(done.stderr[-3000:])
        return {"argv": argv, "error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, "memory.json")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-trim-rows", action="store_true", help="also run each mode without malloc_trim")
    parser.add_argument("--gpu-shapes", default="llama-1b,llama-8b")
    parser.add_argument("--gpu-steps", type=int, default=2)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--gpu-dry-run", action="store_true", help="run the GPU section's code on CPU, tiny shape")
    parser.add_argument("--lora-modes", default="bf16", help="precisions of the GPU LoRA rows ('' for none)")
    worker = parser.add_argument_group("worker (internal)")
    for name in ("--worker", "--mode", "--storage", "--model", "--data", "--shape"):
        worker.add_argument(name, help=argparse.SUPPRESS)
    worker.add_argument("--no-trim", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--lora", default="no", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_cpu(args: argparse.Namespace, modes: list[str], report: dict) -> None:
    """Prepare an HH slice, then one worker process per mode (and per trim setting) into report["cpu"]."""
    from pipeline.models.assets import smollm2_folder
    from pipeline.prepare.stage import prepare

    model_dir = smollm2_folder()
    with tempfile.TemporaryDirectory() as tmp:
        data = hh_slice(tmp, args.steps * args.batch_size)
        cfg = _config(tmp, str(model_dir), str(data), "float32", args)
        prepare(cfg, show_progress=False)
        common = ["--worker", "cpu", "--storage", tmp, "--model", str(model_dir), "--data", str(data),
                  "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        for mode in modes:
            for no_trim in ([True, False] if args.no_trim_rows else [False]):
                row = _spawn(common + ["--mode", mode] + (["--no-trim"] if no_trim else []))
                report["cpu"].append(row)
                print(json.dumps(row), file=sys.stderr)


def print_cpu(args: argparse.Namespace, report: dict) -> None:
    print(f"\nSmolLM2-135M full fine-tuning, CPU ({os.cpu_count()} cores), {args.batch_size} HH pairs/step, "
          f"max_length {args.max_length}, {args.steps} steps\n")
    print(f"{'mode':<12}{'trim':<6}{'state B/param':>14}{'peak RSS MB':>13}   peak RSS MB per step")
    for r in report["cpu"]:
        if "error" in r:
            print(f"{' '.join(r['argv'][-2:]):<18} failed: {r['error']}")
            continue
        steps = " ".join(f"{v:.0f}" for v in r["peak_rss_mb_per_step"])
        print(f"{r['mode']:<12}{'yes' if r['trim'] else 'no':<6}{r['state_bytes_per_param']:>14.1f}"
              f"{r['peak_rss_mb']:>13.0f}   {steps}")


def run_gpu(args: argparse.Namespace, modes: list[str], report: dict) -> None:
    """One worker process per shape x mode (then x LoRA mode) into report["gpu"]."""
    shapes = ["tiny"] if args.gpu_dry_run else args.gpu_shapes.split(",")
    for shape in shapes:
        runs = [(mode, "no") for mode in modes] + [(m, "yes") for m in args.lora_modes.split(",") if m]
        for mode, lora in runs:
            row = _spawn(["--worker", "gpu", "--shape", shape, "--mode", mode, "--steps", str(args.gpu_steps),
                          "--lora", lora])
            report["gpu"].append(row)
            print(json.dumps(row), file=sys.stderr)


def print_gpu(report: dict) -> None:
    import torch

    print(f"\nGPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'dry run on CPU'}, "
          "full fine-tuning, gradient checkpointing, 1 pair (512 + 256 + 256 tokens) per step\n")
    print(f"{'model':<10}{'mode':<20}{'params (B)':>11}{'peak GiB':>10}{'B/param':>9}{'s/step':>8}")
    for r in report["gpu"]:
        if not r.get("ok"):
            print(f"{r.get('shape', '?'):<10}{r.get('mode', '?'):<20}  {r.get('error')}")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        per = "-" if r["peak_bytes_per_param"] is None else f"{r['peak_bytes_per_param']:.1f}"
        seconds = r.get("step_seconds") or [float("nan")]
        print(f"{r['shape']:<10}{r['mode']:<20}{r['parameters'] / 1e9:>11.2f}{peak:>10}{per:>9}{seconds[-1]:>8.2f}")


def main() -> int:
    args = parse_args()
    if args.worker:
        print(json.dumps(cpu_worker(args) if args.worker == "cpu" else gpu_worker(args)))
        return 0

    import torch

    modes = args.modes.split(",")
    report = {"bench": "memory", "cpu": [], "gpu": []}
    if not args.skip_cpu:
        run_cpu(args, modes, report)
        print_cpu(args, report)
    if torch.cuda.is_available() or args.gpu_dry_run:
        run_gpu(args, modes, report)
        print_gpu(report)
    else:
        print("\nGPU section skipped: no CUDA device")
    return finish(args.out, report)


if __name__ == "__main__":
    sys.exit(main())
