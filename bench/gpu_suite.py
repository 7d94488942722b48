"""GPU suite: training speed, model FLOP/s and memory on three model shapes, against TRL 1.16.

One script, one table, one JSON, sized for one GPU in 8 minutes (``--budget-s``, default 420: no
variant starts after it, a running one is killed 45 s later and reported as such). For the
SmolLM2-135M, Llama-1B and Llama-8B shapes (random weights, seeded; random token ids at the
lengths of HH-RLHF harmless-base pairs, as tokenized by SmolLM2's tokenizer and cut as ``dpo
prepare`` cuts them: max_length 1024, prompt 768), each variant in its own process (its own peak
memory; a crash or an OOM is a row with its error, not the end of the suite):

- ours, eager and compiled (train.torch_compile), fused LM head on and off (train.fused_lm_head):
  ``build_trainer`` + ``Trainer.run_step`` (pipeline/train/trainer.py) on ``--batch`` pairs per step,
  train.precision bf16 (pure) on the GPU, gradient checkpointing on the 8B shape only; the
  reference log-probs are zeros (they cost nothing and change no speed or memory);
- TRL 1.16 ``DPOTrainer(precompute_ref_log_probs=True, bf16=True)`` with its GPU defaults
  otherwise (float32 master weights as it loads a model by default, gradient checkpointing on,
  its default optimizer), on the same token ids, pairs, batch and batch order (dataset in our
  trainer's order, sequential sampling); TRL's tokenization is bypassed since the pairs are token
  ids already. Its ``_precompute_ref_logps`` time is a row of its own ("trl precompute");
- scoring (what ``dpo score`` runs): the transformers backend over the same pairs, and vLLM's
  (``load_format="dummy"``: random weights) when ``import vllm`` works.

Measures. tokens/s: sequence tokens (each pair's prompt counted for both responses, as
``batches.token_count``: what a padded trainer such as TRL computes, padding left out) of
the timed steps (after ``--warmup``) over their seconds (each step synchronized). Model FLOP/s
= 6 x N x tokens/s for training (2 x N x tokens/s for scoring and the precompute), N =
non-embedding parameters + the LM head's (vocab x hidden; counted once when tied to the input
embedding); attention's sequence-length term and recomputation (checkpointing) are not counted,
and prefix sharing / padding-free rows, which compute less than the sequence tokens, are
credited with them (the same numerator for ours and TRL). MFU = that / the card's bf16 matmul
rate measured first, in this script (``torch.mm`` of 8192 x 8192 bfloat16 matrices; on the CPU
dry run 512 x 512 float32). Peak memory: ``torch.cuda.max_memory_allocated`` from just before the
first step (weights included); on CPU, the process's max RSS. recompiles: graphs Dynamo compiled
after the first step (``pipeline.models.compiling.graphs_compiled``). "vs TRL": our seconds per step and
peak memory over TRL's on the same shape; for the scoring row, our scoring seconds over TRL's
precompute seconds on the same pairs.

On the lent GPU machine (no network, 64 MiB of files per call, python3 3.12 with torch,
transformers, accelerate, tokenizers, pyarrow and pandas but no TRL, datasets or vLLM):

  here, once:
    .venv/bin/python bench/gpu_check.py --make-bundle .gpu_bundle --rows 256   # HH token ids, ~4 MB
    echo /.gpu_bundle/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    (pure-Python wheels, 1.8 MB together: trl 0.95 MB, datasets 0.61, multiprocess 0.15, dill 0.12;
    ``du -sh .whl .gpu_bundle`` must stay well under the 64 MiB a call carries. TRL 1.16's other
    needs, accelerate>=1.10.1, transformers>=4.56.2, huggingface_hub, pandas, pyarrow, psutil,
    pyyaml, jinja2, are on the image; datasets 5.2 asks for pyarrow>=24, fsspec<=2026.9 and
    xxhash: check with ``python3 -m pip show pyarrow fsspec xxhash`` there, and if pyarrow is
    older, try without it first (--no-deps does not enforce it); pyarrow 26.0.1's cp312 wheel is 55 MB,
    which leaves little of the 64 MiB)
  GPU (device run with carry [".gpu_bundle", ".whl"] and timeout_s 600; the children keep PYTHONPATH):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=.:/tmp/site || exit; \\
    PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --bundle .gpu_bundle --out $OUT/gpu_suite.json
  (without .whl: PYTHONPATH=. python3 bench/gpu_suite.py --out $OUT/gpu_suite.json, and the TRL
  rows say "not importable")

  --quick: what one lease must bring back, in order of value, the JSON rewritten after each row
  (complete: false until the end), so a lease cut short keeps every finished row: the matmul
  rate; (a) scoring on the Llama-1B shape, transformers then vLLM on the same seeded weights
  (saved by the first, read by the second), tokens/s and the per-token max / mean |diff|; (b) ours
  (eager, fused head) and TRL on it, step time and peak memory; (c) ours on the Llama-8B shape,
  its MFU. Sized for 8 minutes of one H100 (--budget-s 420).
    PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --quick --bundle .gpu_bundle --out $OUT/gpu_suite.json
  With vLLM: ``bench/gpu_carry.py calls`` prints the whole lease (vLLM, TRL and the pairs in parts of
  60 MiB, one call each; the last installs them and runs this --quick; docs/development.md).

  here (dry run of every code path on CPU, tiny shapes, under 3 minutes on 2 cores; TRL only where
  it imports, e.g. .venv-bench; compiled variants only with --compile; tests/test_gpu_suite.py):
    PYTHONPATH=. .venv/bin/python bench/gpu_suite.py --dry-run [--compile] [--out x.json]

Without --bundle (or ./.gpu_bundle) the lengths are tokenized here from ../shared/data with
SmolLM2's tokenizer (``pipeline.models.assets.smollm2_folder(with_model=False)``). Writes JSON to --out,
else $OUT/gpu_suite.json when $OUT is set, else bench/results/gpu_suite.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from memory_bench import LLAMA_SHAPES
from trl_compare import read_pairs

from _common import HH_TEST, ROOT, bench_parser, finish, save_report

SHAPES = {  # LlamaConfig keywords; SmolLM2-135M's from its config.json, the Llamas' from memory_bench
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    **LLAMA_SHAPES,
}
CHECKPOINTED = {"llama-8b"}  # our gradient checkpointing (TRL's default is on for every shape)
VARIANTS = {  # name: (torch_compile, fused_lm_head)
    "eager fused": (False, True), "eager unfused": (False, False),
    "compiled fused": (True, True), "compiled unfused": (True, False),
}
GRACE_S = 45  # a variant still running this long after the budget is killed
SEED = 0
GB = 2**30


# --- the work of each child process --------------------------------------------------------------


def token_ids(spec: dict) -> tuple[list, list, list]:
    """Seeded random (prompts, chosens, rejecteds) token ids at ``spec["lengths"]``, in [3, vocab)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    vocab = spec["config"]["vocab_size"]
    rows = [[torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths] for lengths in spec["lengths"]]
    return tuple(list(column) for column in zip(*rows))


def build_model(spec: dict, dtype: str):
    """A seeded random-weight Llama of ``spec["config"]``'s shape on ``spec["device"]`` (sdpa)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec["config"], max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    with torch.device(spec["device"]):
        return LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))


def flop_params(model) -> int:
    """N of the FLOPs formula: non-embedding parameters + the LM head's (a tied head counted once)."""
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("embed_tokens.weight"))
    tied = head is model.get_input_embeddings().weight
    return body + (head.numel() if tied else 0)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float:
    """Peak GPU memory allocated since ``reset_peak`` (CUDA), else this process's max RSS."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def pair_tokens(lengths: list[list[int]], index) -> int:
    """Sequence tokens of the pairs ``index`` (the prompt counted for both responses)."""
    return sum(2 * lengths[i][0] + lengths[i][1] + lengths[i][2] for i in index)


def matmul_worker(spec: dict) -> dict:
    """The card's bf16 matmul rate (float32 on CPU), and the machine's facts."""
    import torch

    cuda = spec["device"] == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a, b = (torch.randn(n, n, device=spec["device"], dtype=dtype) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    sync(spec["device"])
    reps, start = 0, time.perf_counter()
    while reps < 10 or time.perf_counter() - start < 2.0:
        torch.mm(a, b)
        reps += 1
        if reps % 10 == 0:
            sync(spec["device"])
    sync(spec["device"])
    seconds = time.perf_counter() - start
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, memory_gb=props.total_memory / GB, sms=props.multi_processor_count)
    else:
        facts["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"status": "ok", "flops_per_s": 2 * n**3 * reps / seconds, "n": n, "dtype": str(dtype).split(".")[-1],
            "machine": facts}


def ours_worker(spec: dict) -> dict:
    """Our trainer (build_trainer + Trainer.run_step) on the pairs, one variant (compile, fused head)."""
    import torch

    import pipeline.models.precision as precision
    from pipeline.config.load import config_from_dict
    from pipeline.models import compiling
    from pipeline.train.batches import Split
    from pipeline.train.stage import build_trainer

    compiled, fused = VARIANTS[spec["variant"]]
    cfg = config_from_dict({"data": {"path": "unused"}, "model": {"path": "unused"}, "train": {
        "per_device_train_batch_size": spec["batch"], "gradient_accumulation_steps": 1, "max_steps": spec["steps"],
        "precision": spec["precision"], "gradient_checkpointing": spec["checkpointing"], "fused_lm_head": fused,
        "torch_compile": compiled, "learning_rate": 1e-6, "device": spec["device"]}})
    policy = build_model(spec, precision.param_dtype(precision.resolve(cfg))).train()
    if spec["checkpointing"]:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompts, chosens, rejecteds = token_ids(spec)
    zeros = torch.zeros(len(prompts), dtype=torch.float64)
    split = Split([str(i) for i in range(len(prompts))], prompts, chosens, rejecteds, zeros, zeros.clone())
    empty = Split([], [], [], [], torch.zeros(0), torch.zeros(0))
    trainer = build_trainer(cfg, {"train": split, "eval": empty}, policy)
    reset_peak(spec["device"])
    records, graphs = [], []
    for step in range(spec["steps"]):
        records.append(trainer.run_step(step))
        graphs.append(compiling.graphs_compiled())
    timed = records[spec["warmup"]:]
    seconds = [r["seconds"] for r in timed]
    tokens = [r["tokens/s"] * r["seconds"] for r in timed]
    return {"status": "ok", "losses": [r["loss"] for r in records], "step_seconds": [r["seconds"] for r in records],
            "step_s": statistics.fmean(seconds), "tokens_per_s": sum(tokens) / sum(seconds),
            "peak_gb": peak_gb(spec["device"]), "graphs": graphs[-1], "recompiles": graphs[-1] - graphs[0],
            "flop_params": flop_params(policy), "checkpointing": spec["checkpointing"], "precision": spec["precision"],
            "micro_batch_tokens": trainer.token_budget}


def trl_callback(device: str, log: dict):
    """A TrainerCallback: each step's seconds (synchronized), each logged loss, the peak memory of
    training (reset when it begins) into ``log``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        started = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            reset_peak(device)

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            log.setdefault("step_seconds", []).append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log.setdefault("losses", []).append(logs["loss"])

    return StepTimer()


def patch_trl(spans: dict) -> None:
    """DPOTrainer takes our token ids as they are (its tokenization left out: the dataset holds
    prompt_ids / chosen_ids / rejected_ids already) and times its reference precompute."""
    from trl import DPOTrainer

    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        sync(self.accelerator.device.type)
        started = time.perf_counter()
        out = precompute(self, *args, **kwargs)
        sync(self.accelerator.device.type)
        spans["precompute_s"] = spans.get("precompute_s", 0.0) + time.perf_counter() - started
        return out

    DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kwargs: dataset
    DPOTrainer._precompute_ref_logps = timed_precompute


def tiny_tokenizer():
    """A word-level tokenizer with only <pad> (0), <eos> (1) and <unk> (2): TRL reads its pad id;
    the token ids are ours."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def trl_config(spec: dict):
    """DPOConfig: precompute_ref_log_probs, bf16, our batch and steps, no saving or reporting; TRL's
    defaults otherwise. Sequential sampling (our batches, in our order) where this transformers has
    train_sampling_strategy; without it TRL's batches differ and only their token counts match."""
    from trl import DPOConfig

    extra = {"train_sampling_strategy": "sequential"} \
        if "train_sampling_strategy" in {f.name for f in dataclasses.fields(DPOConfig)} else {}
    return DPOConfig(output_dir=tempfile.mkdtemp(prefix="gpu-suite-trl-"), precompute_ref_log_probs=True, bf16=True,
                     per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1, max_steps=spec["steps"],
                     seed=SEED, logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no",
                     disable_tqdm=True, use_cpu=spec["device"] == "cpu", **extra)


def count_tokens(trainer, counts: list) -> None:
    """Sequence tokens of each batch the trainer collates from now on (its steps, in order), into ``counts``."""
    collate = trainer.data_collator

    def counting(features):
        counts.append(sum(2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features))
        return collate(features)

    trainer.data_collator = counting


def trl_worker(spec: dict) -> dict:
    """TRL's DPOTrainer(precompute_ref_log_probs=True, bf16=True), its defaults otherwise, on our
    pairs in our trainer's batch order."""
    import trl
    from datasets import Dataset
    from trl import DPOTrainer

    from pipeline.train.batches import batch_indices

    prompts, chosens, rejecteds = token_ids(spec)
    n = len(prompts)
    order = batch_indices(0, n, n, SEED)  # our trainer's permutation: TRL's step k = our step k
    dataset = Dataset.from_dict({"prompt_ids": [prompts[i] for i in order], "chosen_ids": [chosens[i] for i in order],
                                 "rejected_ids": [rejecteds[i] for i in order]})
    spans, log, counts = {}, {}, []
    patch_trl(spans)
    config = trl_config(spec)
    model = build_model(spec, "float32")  # what DPOTrainer loads from a path by default (model_init_kwargs)
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tiny_tokenizer(),
                         callbacks=[trl_callback(spec["device"], log)])
    setup_s = time.perf_counter() - started
    count_tokens(trainer, counts)
    trainer.train()
    seconds = log["step_seconds"][spec["warmup"]:]
    tokens = sum(counts[spec["warmup"]:spec["steps"]])
    return {"status": "ok", "trl": trl.__version__, "setup_s": setup_s, "precompute_s": spans.get("precompute_s"),
            "precompute_tokens": pair_tokens(spec["lengths"], range(n)), "losses": log.get("losses", []),
            "step_seconds": log["step_seconds"], "step_s": statistics.fmean(seconds), "tokens_per_s": tokens / sum(seconds),
            "peak_gb": peak_gb(spec["device"]), "flop_params": flop_params(model), "sequential": bool(
                getattr(config, "train_sampling_strategy", None) == "sequential"),
            "checkpointing": bool(config.gradient_checkpointing), "precision": "bf16 autocast, float32 weights"}


def timed_scoring(scorer, spec: dict, data: tuple) -> dict:
    """A warm-up on 8 pairs, then all of them timed; tokens/s, seconds and peak memory. With
    ``spec["values_dir"]`` (--quick), the per-token log-probs go to <values_dir>/<kind>.npy, for
    the parent's vLLM-vs-transformers comparison."""
    prompts, chosens, rejecteds = data
    scorer.score_pairs(prompts[:8], chosens[:8], rejecteds[:8])
    reset_peak(spec["device"])
    started = time.perf_counter()
    chosen, rejected = scorer.score_pairs(prompts, chosens, rejecteds)
    sync(spec["device"])
    seconds = time.perf_counter() - started
    tokens = pair_tokens(spec["lengths"], range(len(prompts)))
    if spec.get("values_dir"):
        import numpy as np

        np.save(Path(spec["values_dir"]) / f"{spec['kind']}.npy",
                np.concatenate([np.asarray(v, dtype=np.float64) for v in chosen + rejected]))
    return {"status": "ok", "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_gb": peak_gb(spec["device"])}


def score_worker(spec: dict) -> dict:
    """The transformers scorer (what `dpo score` runs) over the pairs, the model in bfloat16 on the GPU."""
    import pipeline.models.loading as models
    from pipeline.config.load import config_from_dict
    from pipeline.logprobs.backends.transformers_backend import TransformersScorer

    dtype = "float32" if spec["precision"] == "float32" else "bfloat16"
    model = build_model(spec, dtype)
    if spec.get("values_dir"):  # --quick: the same weights for vLLM, which reads them from a folder
        model.save_pretrained(Path(spec["values_dir"]) / "model", safe_serialization=True)
    models.load_causal_lm = lambda model_cfg, device: model.to(device).eval()  # the random weights, no files
    cfg = config_from_dict({"data": {"path": "unused"}, "model": {"path": "unused", "dtype": dtype},
                            "score": {"backend": "transformers", "device": spec["device"]}})
    scorer = TransformersScorer(cfg)
    out = timed_scoring(scorer, spec, token_ids(spec))
    return {**out, "flop_params": flop_params(model), "settings": scorer.settings}


def vllm_worker(spec: dict) -> dict:
    """vLLM's scorer (pipeline/logprobs/backends/vllm.py) over the pairs: random weights (load_format
    dummy), or with --quick the transformers row's seeded weights, saved by its worker."""
    import functools

    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 (any failure to import is "not importable")
        return {"status": "not importable", "error": repr(exc)[:200]}
    from transformers import LlamaConfig

    from pipeline.config.load import config_from_dict
    from pipeline.logprobs.backends.vllm import VllmScorer

    folder = Path(spec["values_dir"]) / "model" if spec.get("values_dir") else None
    if folder is None or not (folder / "config.json").is_file():  # no weights saved: random ones of vLLM's
        folder = Path(tempfile.mkdtemp(prefix="gpu-suite-vllm-"))
        LlamaConfig(**spec["config"], max_position_embeddings=4096, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
        vllm.LLM = functools.partial(vllm.LLM, load_format="dummy")
    dtype = "float32" if spec["precision"] == "float32" else "bfloat16"
    cfg = config_from_dict({"data": {"path": "unused"}, "model": {"path": str(folder), "dtype": dtype},
                            "score": {"backend": "vllm", "gpu_memory_utilization": 0.85}})
    longest = max(p + max(c, r) for p, c, r in spec["lengths"])
    out = timed_scoring(VllmScorer(cfg, longest), spec, token_ids(spec))
    return {**out, "peak_gb": None, "vllm": vllm.__version__}  # vLLM takes its memory share up front


WORKERS = {"matmul": matmul_worker, "ours": ours_worker, "trl": trl_worker, "score": score_worker,
           "vllm": vllm_worker}


def worker_main(spec_path: str, result_path: str) -> int:
    """Run one child's work; its row (or its error, an OOM named as such) into ``result_path``."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        row = WORKERS[spec["kind"]](spec)
    except Exception as exc:  # noqa: BLE001 (the row says what broke; the suite goes on)
        text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        oom = "OutOfMemoryError" in type(exc).__name__ or "out of memory" in str(exc).lower()
        traceback.print_exc()
        row = {"status": "OOM" if oom else "error", "error": text}
    Path(result_path).write_text(json.dumps(row))
    return 0


# --- the parent: data, plan, children, table -----------------------------------------------------


def hh_lengths(args: argparse.Namespace, count: int) -> list[list[int]]:
    """(prompt, chosen, rejected) token counts of the first ``count`` HH harmless-base pairs (from
    the gpu_check bundle, else tokenized here with SmolLM2's tokenizer), cut as prepare cuts them
    (the prompt to --max-prompt, then each response to --max-length with the prompt)."""
    if args.bundle is not None and (args.bundle / "examples.parquet").is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(args.bundle / "examples.parquet", columns=["prompt_ids", "chosen_ids", "rejected_ids"])
        raw = [[len(x) for x in row] for row in zip(*(table.column(k).to_pylist() for k in table.column_names))]
        source = f"bundle {args.bundle}"
    else:
        if not HH_TEST.is_file():
            raise SystemExit(f"{HH_TEST} is missing: pass --bundle (bench/gpu_check.py --make-bundle)")
        from transformers import AutoTokenizer

        from pipeline.models.assets import smollm2_folder

        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_folder(with_model=False)))
        pairs = list(read_pairs(HH_TEST).values())[:count]
        raw = [[len(tokenizer(text, add_special_tokens=False).input_ids) for text in pair] for pair in pairs]
        source = f"{HH_TEST.name}, SmolLM2 tokenizer"
    lengths = []
    for k in range(count):  # repeat the rows when there are fewer than count
        prompt, chosen, rejected = raw[k % len(raw)]
        prompt = max(1, min(prompt, args.max_prompt))
        room = max(1, args.max_length - prompt)
        lengths.append([prompt, max(1, min(chosen, room)), max(1, min(rejected, room))])
    print(f"lengths: {count} pairs from {source}", file=sys.stderr)
    return lengths


def quick_plan(args: argparse.Namespace) -> list[dict]:
    """--quick, in order of value (a cut lease keeps what finished): the matmul rate; (a) scoring,
    transformers then vLLM on the same weights, on the first shape; (b) ours (eager, fused head)
    and TRL on it; (c) ours on the last shape too, for its MFU."""
    shapes = args.shapes.split(",")
    first, last = shapes[0], shapes[-1]
    jobs = [{"kind": "matmul", "shape": None, "variant": "matmul"},
            {"kind": "score", "shape": first, "variant": "score transformers"},
            {"kind": "vllm", "shape": first, "variant": "score vllm"},
            {"kind": "ours", "shape": first, "variant": "eager fused"},
            {"kind": "trl", "shape": first, "variant": "trl"}]
    return jobs + ([{"kind": "ours", "shape": last, "variant": "eager fused"}] if last != first else [])


def plan(args: argparse.Namespace) -> list[dict]:
    """The jobs in order of importance and cost (the budget cuts the last): the matmul rate; ours
    eager with the fused head; TRL; transformers scoring; the fused head off; ours compiled (tens of
    seconds of compiling each; the unfused one reuses the fused one's cached graphs); vLLM."""
    shapes = args.shapes.split(",")
    each = lambda **job: [{"shape": shape, **job} for shape in shapes]  # noqa: E731
    wanted = args.variants.split(",")
    ours = lambda name: each(kind="ours", variant=name) if name in wanted else []  # noqa: E731
    return ([{"kind": "matmul", "shape": None, "variant": "matmul"}] + ours("eager fused")
            + each(kind="trl", variant="trl") + each(kind="score", variant="score transformers")
            + ours("eager unfused") + ours("compiled fused") + ours("compiled unfused")
            + each(kind="vllm", variant="score vllm"))


@dataclasses.dataclass
class Suite:
    """What every job shares: the options, the pairs' lengths, a scratch folder, the deadline."""

    args: argparse.Namespace
    lengths: list[list[int]]
    tmp: Path
    started: float

    def spec(self, job: dict) -> dict:
        shape = job["shape"]
        values = self.tmp / f"values-{shape}" if self.args.quick and job["kind"] in ("score", "vllm") else None
        if values is not None:
            values.mkdir(exist_ok=True)
        return {**job, "values_dir": str(values) if values else None, "device": self.args.device, "precision": self.args.precision, "batch": self.args.batch,
                "steps": self.args.steps, "warmup": self.args.warmup, "lengths": self.lengths,
                "config": SHAPES[shape] if shape else None, "checkpointing": shape in CHECKPOINTED}

    def env(self) -> dict:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PYTHONPATH": path, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "HF_DATASETS_CACHE": str(self.tmp / "hf-datasets")}


def skip_reason(job: dict, args: argparse.Namespace) -> tuple[str, str] | None:
    """(status, why) of a job that is not run, or None."""
    if job["kind"] == "ours" and VARIANTS[job["variant"]][0] and args.device == "cpu" and not args.compile:
        return "skipped", "compiled variants on CPU only with --compile"
    for kind, module in (("trl", "trl"), ("vllm", "vllm")):
        if job["kind"] == kind and importlib.util.find_spec(module) is None:
            return "not importable", f"{module} is not installed here"
    return None


def run_job(suite: Suite, number: int, job: dict) -> dict:
    """One job in its own process, within the budget: its row."""
    row = {k: job[k] for k in ("kind", "shape", "variant")}
    skipped = skip_reason(job, suite.args)
    elapsed = time.monotonic() - suite.started
    if skipped is None and elapsed > suite.args.budget_s:
        skipped = ("skipped", f"time budget ({suite.args.budget_s:.0f} s) spent")
    if skipped is not None:
        return {**row, "status": skipped[0], "error": skipped[1]}
    spec_path, result_path, log_path = (suite.tmp / f"{number}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(suite.spec(job)))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path), "--result", str(result_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=suite.env(), cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, suite.args.budget_s + GRACE_S - elapsed))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group: inductor's workers too
            proc.wait()
    row["wall_s"] = time.monotonic() - suite.started - elapsed
    tail = log_path.read_text(errors="replace").splitlines()[-12:]
    if result_path.is_file():
        row.update(json.loads(result_path.read_text()))
    else:
        killed = proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
        row.update(status="error", error="killed at the time budget" if killed else f"exit {proc.returncode}")
    if row["status"] not in ("ok", "not importable"):
        row["log_tail"] = tail
    return row


def compare_scores(suite: Suite, row: dict) -> None:
    """--quick: the vLLM row gets the per-token max and mean |diff| of its log-probs against the
    transformers scorer's on the same weights and pairs."""
    folder = suite.tmp / f"values-{row['shape']}"
    if row["kind"] != "vllm" or row["status"] != "ok" or not (folder / "score.npy").is_file():
        return
    import numpy as np

    ours, theirs = np.load(folder / "score.npy"), np.load(folder / "vllm.npy")
    if ours.shape != theirs.shape:
        row["diff_error"] = f"{ours.size} vs {theirs.size} token values"
        return
    diff = np.abs(ours - theirs)
    row.update(max_abs_diff_per_token=float(diff.max()), mean_abs_diff_per_token=float(diff.mean()))


def add_derived(rows: list[dict], rate: float | None) -> None:
    """MFU of each row, and ours against TRL (step time, peak memory; scoring vs precompute)."""
    trl = {r["shape"]: r for r in rows if r["kind"] == "trl" and r["status"] == "ok"}
    for row in trl.values():  # its precompute: a row after it
        if row.get("precompute_s"):
            rows.insert(rows.index(row) + 1, {
                "kind": "trl precompute", "shape": row["shape"], "variant": "trl precompute", "status": "ok",
                "seconds": row["precompute_s"], "tokens_per_s": row["precompute_tokens"] / row["precompute_s"],
                "flop_params": row["flop_params"]})
    for row in rows:
        if row["status"] != "ok" or "tokens_per_s" not in row:
            continue
        factor = 6 if row["kind"] in ("ours", "trl") else 2
        if rate and row.get("flop_params"):
            row["model_flops_per_s"] = factor * row["flop_params"] * row["tokens_per_s"]
            row["mfu"] = row["model_flops_per_s"] / rate
        ref = trl.get(row["shape"])
        if ref is None:
            continue
        if row["kind"] == "ours":
            row["step_vs_trl"] = row["step_s"] / ref["step_s"]
            row["peak_vs_trl"] = row["peak_gb"] / ref["peak_gb"] if ref.get("peak_gb") else None
        elif row["kind"] == "score" and ref.get("precompute_s"):
            row["score_vs_trl_precompute"] = row["seconds"] / ref["precompute_s"]


def fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def vs_trl(row: dict) -> str:
    if "step_vs_trl" in row:
        return f"step {fmt(row['step_vs_trl'], '.2f')}x, mem {fmt(row.get('peak_vs_trl'), '.2f')}x"
    if "score_vs_trl_precompute" in row:
        return f"{fmt(row['score_vs_trl_precompute'], '.2f')}x of TRL precompute s"
    return "-"


def print_table(report: dict) -> None:
    s, m = report["settings"], report["machine"]
    print(f"\n### GPU suite: {m.get('device', '?')}, torch {m.get('torch')}, {report['matmul_dtype']} matmul rate "
          f"{fmt((report['matmul_flops_per_s'] or 0) / 1e12, '.3g')} TFLOP/s measured"
          f"{' (CPU: a dry run)' if s['device'] == 'cpu' else ''}\n")
    print(f"{s['pairs']} HH-length pairs ({s['mean_pair_tokens']:.0f} sequence tokens each on average), "
          f"{s['batch']} pairs/step, {s['steps']} steps ({s['warmup']} warm-up), ours precision {s['precision']}, "
          f"gradient checkpointing (ours) on {', '.join(sorted(CHECKPOINTED)) or 'none'}; time s: per step "
          f"(training), for all pairs (scoring, precompute); peak GB: {'GPU allocated' if s['device'] == 'cuda' else 'RSS'}; "
          "1st loss: ours against zero reference log-probs, TRL against its precomputed ones (ln 2)\n")
    print("| shape | variant | status | tok/s | MFU | peak GB | time s | recompiles | 1st loss | vs TRL |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in report["rows"]:
        if r["kind"] == "matmul":
            continue
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"[:70]
        loss = (r.get("losses") or [None])[0]
        seconds = r.get("step_s", r.get("seconds"))
        print(f"| {r['shape']} | {r['variant']} | {status} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
              f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_gb'), '.2f')} | {fmt(seconds, '.3f')} | "
              f"{fmt(r.get('recompiles'), 'd')} | {fmt(loss, '.4f')} | {vs_trl(r)} |")
    for r in report["rows"]:
        if "max_abs_diff_per_token" in r:
            print(f"\nvLLM vs transformers on the same weights and pairs ({r['shape']}): per-token |diff| max "
                  f"{r['max_abs_diff_per_token']:.3g}, mean {r['mean_abs_diff_per_token']:.3g} nats")


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__, "gpu_suite.json", gpu=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, a few pairs: the code paths")
    parser.add_argument("--quick", action="store_true",
                        help="what one lease must bring back, in order of value: scoring vLLM vs transformers (tokens/s, "
                             "per-token |diff|), ours vs TRL (step, memory) on the Llama-1B shape, MFU of 1B and 8B")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="ours: comma-separated, of the default")
    parser.add_argument("--compile", action="store_true", help="compiled variants on CPU too (slow)")
    parser.add_argument("--precision", choices=["bf16", "bf16-mixed", "float32"], help="ours (default bf16; CPU float32)")
    parser.add_argument("--batch", type=int, help="pairs per step (default 8; dry run 2)")
    parser.add_argument("--steps", type=int, help="steps per variant (default 8; dry run 3)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default 3; dry run 1)")
    parser.add_argument("--max-length", type=int, help="prompt + response tokens (default 1024; dry run 64)")
    parser.add_argument("--max-prompt", type=int, help="prompt tokens (default 768; dry run 32)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no variant starts after this many seconds")
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu_bundle", help="bench/gpu_check.py's bundle")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dry = args.dry_run or args.device == "cpu"
    shapes = "llama-1b,llama-8b" if args.quick else "smollm2-135m,llama-1b,llama-8b"
    defaults = {"device": "cpu" if args.dry_run else "cuda", "shapes": "tiny" if dry else shapes,
                "precision": "float32" if dry else "bf16", "batch": 2 if dry else 8, "steps": 3 if dry else 8,
                "warmup": 1 if dry else 3, "max_length": 64 if dry else 1024, "max_prompt": 32 if dry else 768}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> int:
    args = parse_args()
    if args.worker:
        return worker_main(args.worker, args.result)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU here: run this on the lent GPU machine, or --dry-run", file=sys.stderr)
            return 1
    lengths = hh_lengths(args, args.batch * args.steps)
    report = {"bench": "gpu_suite", "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                                 if k not in ("worker", "result")}, "rows": []}
    report["settings"].update(pairs=len(lengths), mean_pair_tokens=pair_tokens(lengths, range(len(lengths))) / len(lengths),
                              lengths=lengths)
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        suite = Suite(args, lengths, Path(tmp), time.monotonic())
        for number, job in enumerate(quick_plan(args) if args.quick else plan(args)):
            row = run_job(suite, number, job)
            compare_scores(suite, row)
            report["rows"].append(row)
            print(f"[{time.monotonic() - suite.started:5.0f} s] {row['kind']} {row['shape'] or ''} {row['variant']}: "
                  f"{row['status']} {row.get('error', '')}", file=sys.stderr, flush=True)
            save_report(args.out, {**report, "complete": False})  # a cut lease keeps every finished row
    matmul = next(r for r in report["rows"] if r["kind"] == "matmul")
    from importlib.metadata import version

    report["machine"] = {"python": platform.python_version(), "torch": version("torch"), **matmul.get("machine", {})}
    report["matmul_flops_per_s"], report["matmul_dtype"] = matmul.get("flops_per_s"), matmul.get("dtype")
    add_derived(report["rows"], report["matmul_flops_per_s"])
    print_table(report)
    return finish(args.out, {**report, "complete": True})


if __name__ == "__main__":
    sys.exit(main())
