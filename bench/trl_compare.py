"""Side by side with TRL's DPOTrainer(precompute_ref_log_probs=True): same model, rows, batches, steps.

    make bench-trl   (builds .venv-bench: the dev lock + requirements/bench-trl.txt, i.e. TRL 1.16.0)
    PYTHONPATH=. .venv-bench/bin/python bench/trl_compare.py [--rows 128] [--steps 10] [--batch 4]
        [--max-length 512] [--threads 2] [--only ours|trl] [--trl-gradient-checkpointing]
        [--set train.KEY=VALUE ...]   (our side only: e.g. train.torch_compile=true)

SmolLM2-135M-Instruct (``pipeline.models.assets.smollm2_folder()``, float32) on the first ``--rows`` rows of
HH-RLHF harmless-base (test split, read from ../shared/data). Every stage runs in its own child
process with ``OMP_NUM_THREADS`` = ``--threads`` (and the TRL child calls ``torch.set_num_threads``),
so wall times include process start-up as a user sees it and each process's peak RSS is its own
(``os.wait4``'s ru_maxrss, which covers a process's own children too).

- ours: ``dpo prepare``, ``dpo score`` (transformers backend), ``dpo train`` (``python -m
  flows.cli``, a config written to a temporary storage). Setup time = prepare + score wall.
- TRL: one process: read the same rows, split as our prepare does for implicit HH text (prompt = up
  to and including the last "\\n\\nAssistant:" both share), build ``DPOTrainer`` (loads model and
  tokenizer, tokenizes, hashes the model, precomputes the reference log-probs: TRL 1.16 does all of
  it in ``__init__``), then ``trainer.train()``. Setup time = process start until the trainer is
  built; the ``_precompute_ref_logps`` call alone is reported too.

Same settings on both sides: max_length (ours with ``tokenize.max_prompt_length: null``, so both
only cut each prompt + response sequence at its end, TRL's ``truncation_mode="keep_start"``), the
rows our prepare kept, ``--batch`` pairs per step without accumulation, AdamW (``torch.optim.AdamW``:
TRL ``optim="adamw_torch"``), learning rate 1e-6, cosine schedule, no warmup, no weight decay,
clipping 1.0, beta 0.1, sigmoid loss, no gradient checkpointing (TRL's default is on:
``--trl-gradient-checkpointing`` keeps it), no bf16, no saving. TRL gets the same batches in the same
order: its dataset is ordered by our trainer's permutation (``pipeline.train.batches.batch_indices``) and
sampled sequentially (exact as long as steps x batch <= rows).

Step time: seconds per optimizer step, mean over the steps after the first (warm-up); ours is the
``seconds`` of each step in ``metrics.jsonl`` (timed inside ``Trainer.train_step``), TRL's from a
``TrainerCallback`` (``on_step_begin`` to ``on_step_end``). The three ratios are ours / TRL's.

Reference agreement: TRL's precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` against our
cache's ``chosen_logp`` / ``rejected_logp``, row by row, where both sides fed the model the same
token sequences (rows whose tokenization or truncation differs are counted and left out).
Writes bench/results/trl_compare.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, bench_parser, finish, hh_slice

MARKER = "\n\nAssistant:"
LEARNING_RATE = 1e-6
BETA = 0.1
SCHEDULE = "cosine"
SEED = 0
GB = 1e9


# --- shared by both sides ------------------------------------------------------------------------


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) as our prepare splits implicit text, or None
    where it rejects the row (no shared prompt, an empty response)."""
    cut = chosen.rfind(MARKER)
    while cut >= 0 and not rejected.startswith(chosen[: cut + len(MARKER)]):
        cut = chosen.rfind(MARKER, 0, cut)
    if cut < 0:
        return None
    end = cut + len(MARKER)
    prompt, c, r = chosen[:end], chosen[end:], rejected[end:]
    if not c.strip() or not r.strip() or c == r:
        return None
    return prompt, c, r


def read_pairs(path: str | Path) -> dict[int, tuple[str, str, str]]:
    """Source row -> (prompt, chosen, rejected) of the rows our prepare would keep (duplicates once)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    pairs, seen = {}, set()
    with opener(path, "rt", encoding="utf-8") as f:
        for row, line in enumerate(f):
            if not line.strip():
                continue
            record = json.loads(line)
            split = split_hh(record["chosen"], record["rejected"])
            if split is not None and split not in seen:
                seen.add(split)
                pairs[row] = split
    return pairs


def vm_hwm_kb() -> int:
    """This process's peak RSS so far (VmHWM), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "nproc": len(os.sched_getaffinity(0)), "python": platform.python_version()}


def cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine so far, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + irq + softirq, steal


def timed_process(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd`` to its end; wall seconds from just before the start, its peak RSS, its exit, and
    the noise around it: CPU seconds that other processes used meanwhile, and steal time."""
    busy0, steal0 = cpu_jiffies()
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - started
    busy1, steal1 = cpu_jiffies()
    tick = os.sysconf("SC_CLK_TCK")
    own = usage.ru_utime + usage.ru_stime
    if proc.returncode:
        sys.stderr.write("".join(log.read_text().splitlines(keepends=True)[-40:]))
        raise SystemExit(f"{' '.join(cmd[1:4])} failed (exit {proc.returncode}); log: {log}")
    return {"started": started, "wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / GB, "cpu_s": own,
            "others_cpu_s": max(0.0, (busy1 - busy0) / tick - own), "steal_s": (steal1 - steal0) / tick}


def steady(times: list[float]) -> dict:
    """Mean and median seconds per step, the first step (warm-up) left out."""
    rest = times[1:] or times
    return {"step_s_mean": statistics.fmean(rest), "step_s_median": statistics.median(rest), "step_seconds": times}


# --- ours ----------------------------------------------------------------------------------------


def our_config(args, tmp: Path, data: Path, model_dir: Path) -> Path:
    config = tmp / "ours.yaml"
    import yaml

    config.write_text(yaml.safe_dump(with_overrides(args.set, {
        "storage": str(tmp / "storage"),
        "data": {"path": str(data), "eval_fraction": 0.0},
        "model": {"path": str(model_dir), "dtype": "float32"},
        "tokenize": {"max_length": args.max_length, "max_prompt_length": None},
        "score": {"backend": "transformers", "device": "cpu"},
        "train": {"per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
                  "max_steps": args.steps, "learning_rate": LEARNING_RATE, "beta": BETA, "loss_type": "sigmoid",
                  "lr_scheduler_type": SCHEDULE, "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "seed": SEED, "logging_steps": 1, "device": "cpu", "run_name": "bench",
                  "gradient_checkpointing": False, "precision": "float32"},
    })))
    return config


def with_overrides(pairs: list[str], config: dict) -> dict:
    """``config`` with each ``section.key=value`` of ``--set`` applied (value parsed as YAML)."""
    import yaml

    for pair in pairs:
        key, _, value = pair.partition("=")
        section, _, name = key.partition(".")
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    return config


def run_ours(args, tmp: Path, config: Path, env: dict) -> dict:
    from pipeline.storage import paths

    stages = {}
    for stage in ("prepare", "score", "train"):
        stages[stage] = timed_process([sys.executable, "-m", "flows.cli", stage, "-c", str(config), "--no-progress"],
                                      env, tmp / f"ours-{stage}.log")
        st = stages[stage]
        print(f"  ours {stage}: {st['wall_s']:.1f} s, peak RSS {st['peak_rss_gb']:.2f} GB "
              f"(others' CPU meanwhile {st['others_cpu_s']:.1f} s)", flush=True)
    records = [json.loads(line) for line in (tmp / "storage" / "runs" / "bench" / paths.METRICS).open()]
    steps = [r for r in records if r.get("step", 0) > 0 and "loss" in r]
    return {
        "stages": stages,
        "setup_s": stages["prepare"]["wall_s"] + stages["score"]["wall_s"],
        "setup_peak_rss_gb": max(stages["prepare"]["peak_rss_gb"], stages["score"]["peak_rss_gb"]),
        "train_process_s": stages["train"]["wall_s"],
        "peak_rss_gb": max(s["peak_rss_gb"] for s in stages.values()),
        **steady([r["seconds"] for r in steps]),
        "losses": [r["loss"] for r in steps],
        "step0": next((r for r in records if r.get("step") == 0), None),
        "others_cpu_s": sum(s["others_cpu_s"] for s in stages.values()),
        "steal_s": sum(s["steal_s"] for s in stages.values()),
    }


def our_rows(config: Path) -> dict:
    """Our prepared train split (in order) with the cached reference log-probs, by source row."""
    import pyarrow.dataset as pa_dataset
    import pyarrow.parquet as pq

    from pipeline.config.load import load_config
    from pipeline.storage import locate, paths, trust

    cfg = load_config(config)
    dataset_dir = locate.find_dataset(cfg)
    cache_dir = locate.find_refscores(cfg, trust.verified_dataset(dataset_dir)["fingerprint"])
    examples = pq.read_table(dataset_dir / paths.EXAMPLES, columns=[
        "id", "split", "source_row", "prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids",
    ]).to_pylist()
    scores = pa_dataset.dataset(sorted(str(p) for p in cache_dir.glob("part-*.parquet")), format="parquet")
    logps = {r["id"]: r for r in scores.to_table(columns=["id", "chosen_logp", "rejected_logp"]).to_pylist()}
    rows = [{**r, **logps[r["id"]]} for r in examples if r["split"] == "train"]
    return {"rows": rows, "rejected": pq.read_metadata(dataset_dir / paths.REJECTS).num_rows}


# --- TRL -----------------------------------------------------------------------------------------


def _trl_dataset(spec: dict, pairs: dict):
    """TRL's train dataset in our trainer's order (``spec["order"]``, or with --only trl our
    permutation of the rows our prepare would keep); returns it and the order."""
    from datasets import Dataset

    order = spec["order"]
    if order is None:  # --only trl: our trainer's permutation of the rows our prepare would keep
        from pipeline.train.batches import batch_indices

        kept = sorted(pairs)
        order = [kept[i] for i in batch_indices(0, len(kept), len(kept), SEED)]
    dataset = Dataset.from_dict({
        "source_row": order,
        "prompt": [pairs[r][0] for r in order],
        "chosen": [pairs[r][1] for r in order],
        "rejected": [pairs[r][2] for r in order],
    })
    return dataset, order


def _time_trl_setup(spans: dict) -> None:
    """Time DPOTrainer's reference precompute and tokenization into ``spans`` (seconds)."""
    from trl import DPOTrainer

    def timed(name, method):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                spans[name] = spans.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    DPOTrainer._precompute_ref_logps = timed("precompute_s", DPOTrainer._precompute_ref_logps)
    DPOTrainer._prepare_dataset = timed("tokenize_s", DPOTrainer._prepare_dataset)


def _step_timer():
    """A TrainerCallback collecting each step's seconds and each logged loss."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.losses, self._t = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return StepTimer()


def _dpo_config(spec: dict):
    """DPOConfig with our side's settings (see the module docstring)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=spec["output_dir"], precompute_ref_log_probs=True, max_length=spec["max_length"],
        truncation_mode="keep_start", per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=LEARNING_RATE, beta=BETA, loss_type=["sigmoid"],
        lr_scheduler_type=SCHEDULE, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        seed=SEED, train_sampling_strategy="sequential", gradient_checkpointing=spec["gradient_checkpointing"],
        bf16=False, fp16=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"},
    )


def trl_child(spec: dict) -> dict:
    """The TRL side, in its own process: build the trainer (precompute included), then train."""
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset  # noqa: F401  (imported with the rest: "imported" marks all of them)
    from transformers import AutoTokenizer, TrainerCallback  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    marks = {"imported": time.time()}
    pairs = read_pairs(spec["data"])
    dataset, order = _trl_dataset(spec, pairs)
    spans: dict = {}
    _time_trl_setup(spans)
    timer = _step_timer()
    config = _dpo_config(spec)
    marks["init_start"] = time.time()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    trainer = DPOTrainer(model=spec["model"], args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    marks["ready"] = time.time()
    setup_hwm = vm_hwm_kb()
    ref = trainer.train_dataset.select_columns(
        ["source_row", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]
    ).to_list()
    for r in ref:
        r["texts"] = pairs[r["source_row"]]
    trainer.train()
    marks["trained"] = time.time()
    return {"marks": marks, **spans, "setup_peak_rss_gb": setup_hwm * 1024 / GB, "step_seconds": timer.seconds,
            "losses": timer.losses, "rows": len(dataset), "rows_trained_on": len(trainer.train_dataset),
            "order": order, "reference": ref,
            "versions": {m: __import__(m).__version__ for m in ("trl", "transformers", "torch", "accelerate",
                                                               "datasets")}}


def run_trl(args, tmp: Path, data: Path, model_dir: Path, env: dict, order: list[int] | None) -> dict:
    spec = {"data": str(data), "model": str(model_dir), "threads": args.threads, "batch": args.batch,
            "steps": args.steps, "max_length": args.max_length, "order": order, "output_dir": str(tmp / "trl-out"),
            "gradient_checkpointing": args.trl_gradient_checkpointing, "result": str(tmp / "trl-result.json")}
    (tmp / "trl-spec.json").write_text(json.dumps(spec))
    proc = timed_process([sys.executable, __file__, "--side", "trl", "--spec", str(tmp / "trl-spec.json")],
                         env, tmp / "trl.log")
    child = json.loads(Path(spec["result"]).read_text())
    marks = child.pop("marks")
    out = {
        "setup_s": marks["ready"] - proc["started"],  # process start .. trainer built (precompute included)
        "import_s": marks["imported"] - proc["started"],
        "init_s": marks["ready"] - marks["init_start"],
        "train_process_s": proc["wall_s"] - (marks["ready"] - proc["started"]),
        "total_s": proc["wall_s"],
        "peak_rss_gb": proc["peak_rss_gb"],
        "others_cpu_s": proc["others_cpu_s"],
        "steal_s": proc["steal_s"],
        **child,
        **steady(child["step_seconds"]),
    }
    print(f"  TRL: trainer ready after {out['setup_s']:.1f} s (precompute {out['precompute_s']:.1f} s), "
          f"process {proc['wall_s']:.1f} s, peak RSS {proc['peak_rss_gb']:.2f} GB "
          f"(others' CPU meanwhile {proc['others_cpu_s']:.1f} s)", flush=True)
    return out


# --- comparison ----------------------------------------------------------------------------------


def agreement(ours: list[dict], trl: list[dict], max_length: int) -> dict:
    """TRL's precomputed reference log-probs against our cache, where both scored the same tokens."""
    by_row = {r["source_row"]: r for r in ours}
    counts = {"compared": 0, "only_trl": 0, "texts_differ": 0, "prompt_tokens_differ": 0,
              "response_tokens_differ": 0, "truncated_both": 0}
    diffs, per_token = [], []
    for t in trl:
        o = by_row.get(t["source_row"])
        if o is None:
            counts["only_trl"] += 1
            continue
        if tuple(t["texts"]) != (o["prompt"], o["chosen"], o["rejected"]):
            counts["texts_differ"] += 1
            continue
        if t["prompt_ids"] != o["prompt_ids"]:
            counts["prompt_tokens_differ"] += 1
            continue
        # TRL's collator cuts prompt + response at max_length (keep_start); ours cut the responses.
        same = all((t["prompt_ids"] + t[f"{side}_ids"])[:max_length] == o["prompt_ids"] + o[f"{side}_ids"]
                   for side in ("chosen", "rejected"))
        if not same:
            counts["response_tokens_differ"] += 1
            continue
        counts["truncated_both"] += any(len(t["prompt_ids"]) + len(t[f"{s}_ids"]) > max_length
                                        for s in ("chosen", "rejected"))
        counts["compared"] += 1
        for side in ("chosen", "rejected"):
            d = abs(t[f"ref_{side}_logps"] - o[f"{side}_logp"])
            diffs.append(d)
            per_token.append(d / max(1, len(o[f"{side}_ids"])))
    counts["only_ours"] = len(set(by_row) - {t["source_row"] for t in trl})
    if diffs:
        counts.update(max_abs_diff=max(diffs), mean_abs_diff=statistics.fmean(diffs),
                      max_abs_diff_per_token=max(per_token))
    return counts


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(value, spec=".2f"):
    return "n/a" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    s, m = report["settings"], report["machine"]
    ours, trl, r = report.get("ours") or {}, report.get("trl") or {}, report["ratios"]
    print(f"\n### dpo-pipeline vs TRL {report.get('versions', {}).get('trl', '')} DPOTrainer"
          f"(precompute_ref_log_probs=True)\n")
    load = ", ".join(f"{k} {v:.2f}" for k, v in report["load"].items())
    print(f"machine: {m['cpu']}, nproc {m['nproc']}; 1-minute load average {load}")
    print(f"SmolLM2-135M-Instruct {s['dtype']}, HH harmless-base first {s['rows']} rows "
          f"({s['pairs']} pairs kept), {s['steps']} steps x {s['batch']} pairs, max_length {s['max_length']}, "
          f"{s['threads']} threads, beta {BETA}, AdamW lr {LEARNING_RATE:g} {SCHEDULE}, no warmup, "
          f"TRL gradient checkpointing {'on' if s['trl_gradient_checkpointing'] else 'off'}\n")
    rows = [
        ("prepare + score wall s / TRL start to trainer built", ours.get("setup_s"), trl.get("setup_s"),
         r.get("setup")),
        ("  TRL: `_precompute_ref_logps` alone, s", None, trl.get("precompute_s"), r.get("setup_vs_precompute_only")),
        ("  TRL: tokenize (`_prepare_dataset`), s", None, trl.get("tokenize_s"), None),
        ("train step s (mean of steps 2..N)", ours.get("step_s_mean"), trl.get("step_s_mean"), r.get("train_step")),
        ("train step s (median of steps 2..N)", ours.get("step_s_median"), trl.get("step_s_median"),
         r.get("train_step_median")),
        ("train process s (ours: `dpo train`; TRL: after setup)", ours.get("train_process_s"),
         trl.get("train_process_s"), None),
        ("peak RSS GB (whole side)", ours.get("peak_rss_gb"), trl.get("peak_rss_gb"), r.get("peak_rss")),
        ("peak RSS GB during setup", ours.get("setup_peak_rss_gb"), trl.get("setup_peak_rss_gb"), None),
        ("other processes' CPU s during the side (noise)", ours.get("others_cpu_s"), trl.get("others_cpu_s"),
         None),
        ("first step loss", (ours.get("losses") or [None])[0], (trl.get("losses") or [None])[0], None),
        ("last step loss", (ours.get("losses") or [None])[-1], (trl.get("losses") or [None])[-1], None),
    ]
    print("| | ours | TRL | ours / TRL |\n|---|---:|---:|---:|")
    for name, a, b, q in rows:
        digits = ".4f" if "loss" in name else ".2f"
        print(f"| {name} | {fmt(a, digits)} | {fmt(b, digits)} | {fmt(q)}{'x' if q is not None else ''} |")
    if "stages" in ours:
        st = ours["stages"]
        print("\nours by stage: " + ", ".join(f"{k} {v['wall_s']:.1f} s / {v['peak_rss_gb']:.2f} GB"
                                              for k, v in st.items()))
    if report.get("same_batches") is not None:
        beyond = s["steps"] * s["batch"] > s["pairs"]
        print(f"same batches on both sides: {report['same_batches']}"
              + (" (steps x batch > pairs: past one epoch TRL repeats the order, ours draws a new permutation)"
                 if beyond else ""))
    a = report.get("reference_agreement")
    if a:
        print(f"reference log-probs, TRL precompute vs our cache: {a['compared']} rows compared, max |diff| "
              f"{fmt(a.get('max_abs_diff'), '.3g')} nats (mean {fmt(a.get('mean_abs_diff'), '.3g')}, per token "
              f"{fmt(a.get('max_abs_diff_per_token'), '.3g')}); left out: texts differ {a['texts_differ']}, prompt "
              f"tokens differ {a['prompt_tokens_differ']}, response tokens / truncation differ "
              f"{a['response_tokens_differ']}, only TRL {a['only_trl']}, only ours {a['only_ours']}; "
              f"{a['truncated_both']} compared rows were cut at max_length")


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, "trl_compare.json")
    parser.add_argument("--rows", type=int, default=128, help="first rows of the HH file (2312: all of it)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (no accumulation)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["ours", "trl"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="our config only, e.g. train.torch_compile=true (TRL's side is unchanged)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default gradient_checkpointing=True (ours has it off)")
    parser.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args()


def new_report(args: argparse.Namespace) -> dict:
    return {"bench": "trl_compare", "machine": machine(), "load": {"before": os.getloadavg()[0]},
            "settings": {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "rows": args.rows,
                         "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
                         "threads": args.threads, "learning_rate": LEARNING_RATE, "beta": BETA,
                         "lr_scheduler_type": SCHEDULE, "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
                         "ours_overrides": args.set},
            "ours": None, "trl": None, "ratios": {}}


def run_sides(args: argparse.Namespace, report: dict) -> list[dict] | None:
    """Ours, then TRL (in our trainer's order), each unless --only leaves it out, into ``report``
    (with the reference agreement and whether the batches matched); returns our train rows."""
    from pipeline.models.assets import smollm2_folder

    model_dir = smollm2_folder()
    n = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="trl-compare-") as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "RAYON_NUM_THREADS": n,
               "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        data = hh_slice(tmp, args.rows)
        config = our_config(args, tmp, data, model_dir)
        order, ours_rows = None, None
        if args.only != "trl":
            report["ours"] = run_ours(args, tmp, config, env)
            prepared = our_rows(config)
            ours_rows = prepared["rows"]
            report["ours"]["rows_rejected_by_prepare"] = prepared["rejected"]
            from pipeline.train.batches import batch_indices

            n_rows = len(ours_rows)
            order = [ours_rows[i]["source_row"] for i in batch_indices(0, n_rows, n_rows, SEED)]
        report["load"]["between"] = os.getloadavg()[0]
        if args.only != "ours":
            report["trl"] = trl = run_trl(args, tmp, data, model_dir, env, order)
            report["versions"] = trl.pop("versions")
            reference = trl.pop("reference")
            trl_order = trl.pop("order")
            if ours_rows is not None:
                report["reference_agreement"] = agreement(ours_rows, reference, args.max_length)
                used = min(args.steps * args.batch, len(order))
                report["same_batches"] = (trl_order[:used] == order[:used] and trl["rows_trained_on"] == len(order)
                                          and args.steps * args.batch <= len(order))
    return ours_rows


def add_ratios(report: dict) -> None:
    """Ours / TRL's setup, step time and peak RSS (when both sides ran); warn if the first losses differ."""
    ours, trl = report["ours"], report["trl"]
    if ours and trl:
        report["ratios"] = {
            "setup": ratio(ours["setup_s"], trl["setup_s"]),
            "setup_vs_precompute_only": ratio(ours["setup_s"], trl["precompute_s"]),
            "train_step": ratio(ours["step_s_mean"], trl["step_s_mean"]),
            "train_step_median": ratio(ours["step_s_median"], trl["step_s_median"]),
            "peak_rss": ratio(ours["peak_rss_gb"], trl["peak_rss_gb"]),
        }
        losses = ours["losses"][0], trl["losses"][0]
        if not math.isclose(*losses, abs_tol=1e-3):
            print(f"warning: first-step losses differ: ours {losses[0]}, TRL {losses[1]}", file=sys.stderr)


def main() -> int:
    args = parse_args()
    if args.side == "trl":
        spec = json.loads(Path(args.spec).read_text())
        Path(spec["result"]).write_text(json.dumps(trl_child(spec)))
        return 0

    report = new_report(args)
    ours_rows = run_sides(args, report)
    report["load"]["after"] = os.getloadavg()[0]
    report["settings"]["pairs"] = len(ours_rows) if ours_rows is not None else report["trl"]["rows"]
    add_ratios(report)
    print_table(report)
    return finish(args.out, report)


if __name__ == "__main__":
    sys.exit(main())
