"""The train stage: DPO with only the policy in memory, reading cached reference log-probs.

    result = train(load_config("run.yaml"))          # or: dpo train -c run.yaml [--resume]
    result.run_dir  # <storage>/runs/<run name>/ with config.yaml, metrics.jsonl, checkpoints/,
                    # final/ (save_pretrained, safetensors + tokenizer), run.json

One linear loop, top to bottom:
  1. find the prepared dataset and its reference cache, and check the contract between them
     (dataset fingerprint, every id scored, token counts equal): refuse on any mismatch;
  2. load exactly one model, the policy (model.path, or train.init_from);
  3. step-0 check: a policy that starts from the reference weights must reproduce the cached
     log-probs on the first batch (rewards 0, loss ln 2);
  4. for each step: grad_accum micro-batches, each ONE forward pass over prompt + chosen +
     rejected (the prompt computed once, see logprobs.pack_shared), loss scaled so the sum of
     micro-batch gradients is the gradient of the mean over the whole batch; clip, AdamW step,
     schedule; metrics to metrics.jsonl; eval and checkpoints on their cadence;
  5. final eval, final/ and run.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import yaml

from .checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from .config import Config, ModelConfig
from .logprobs import pair_logps, supports_shared_prefix
from .losses import LOSSES, rewards
from .models import load_causal_lm, load_tokenizer, model_fingerprint
from .prepare import locate_dataset
from .score import logprob_tolerance, plan_refscores_dir
from .store import atomic_write_json, atomic_write_text, fingerprint, read_manifest

log = logging.getLogger("dpo.train")



class TrainError(RuntimeError):
    """The stage refuses to train (contract broken, bad run folder); says what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    skipped: bool


@dataclass
class Split:
    """Token ids and cached reference log-probs of one split, aligned by row."""

    ids: list[str]
    prompts: list[list[int]]
    chosens: list[list[int]]
    rejecteds: list[list[int]]
    ref_chosen: torch.Tensor  # [N] float64 -> used as float32 in the loss
    ref_rejected: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


# --- 1. inputs and their contract ----------------------------------------------------------------


def locate_ref_cache(cfg: Config, dataset_fp: str) -> Path:
    """The reference cache for this config: train.ref_cache, or the one `dpo score` made."""
    if cfg.train.ref_cache:
        path = Path(cfg.train.ref_cache)
        if not (path / "manifest.json").is_file():
            raise TrainError(f"train.ref_cache {path} has no manifest.json: it is not a score cache")
        return path
    expected = plan_refscores_dir(cfg, dataset_fp)
    if expected.is_dir():
        return expected
    # Scored elsewhere (e.g. with vLLM on a GPU machine): any complete cache of this dataset.
    candidates = []
    for manifest_path in sorted((Path(cfg.storage) / "refscores").glob("*/manifest.json")):
        manifest = read_manifest(manifest_path.parent)
        if manifest and manifest["inputs"]["dataset_fingerprint"] == dataset_fp and manifest.get("complete"):
            candidates.append(manifest_path.parent)
    if len(candidates) == 1:
        log.info("train: using reference cache %s", candidates[0])
        return candidates[0]
    if not candidates:
        raise TrainError(
            f"no reference scores for this dataset under {Path(cfg.storage) / 'refscores'}: run "
            "`dpo score -c CONFIG` first (or set train.ref_cache)"
        )
    raise TrainError(
        f"several reference caches match this dataset ({', '.join(p.name[:12] for p in candidates)}): "
        "set train.ref_cache to the one to train against"
    )


def load_split_data(dataset_dir: Path, cache_dir: Path) -> tuple[dict[str, Split], dict]:
    """Examples joined with their cached reference log-probs, after checking the contract."""
    dataset = read_manifest(dataset_dir)
    cache = read_manifest(cache_dir)
    fix = "rescore with `dpo score -c CONFIG` (or point train.ref_cache at the cache of this dataset)"
    if cache is None or cache.get("kind") != "refscores":
        raise TrainError(f"{cache_dir} is not a reference cache (no refscores manifest)")
    if not cache.get("complete"):
        raise TrainError(f"the reference cache {cache_dir} is incomplete: run `dpo score -c CONFIG` to finish it")
    if cache["inputs"]["dataset_fingerprint"] != dataset["fingerprint"]:
        raise TrainError(
            f"the reference cache {cache_dir.name[:12]} was scored on dataset "
            f"{cache['inputs']['dataset_fingerprint'][:12]}, but this config's dataset is "
            f"{dataset['fingerprint'][:12]}: {fix}"
        )
    examples = pq.read_table(
        dataset_dir / "examples.parquet",
        columns=["id", "split", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_tokens", "rejected_tokens"],
    )
    columns = ["id", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens"]
    scores = pa.concat_tables(
        [pq.read_table(cache_dir / shard["file"], columns=columns) for shard in cache["shards"]]
    )
    ex_ids, sc_ids = examples.column("id"), scores.column("id")
    if pc.count_distinct(sc_ids).as_py() != len(sc_ids):
        raise TrainError(f"the reference cache {cache_dir} lists some ids twice: {fix}")
    position = pc.index_in(ex_ids, value_set=sc_ids)  # row of each example's score, or null
    missing = pc.is_null(position)
    if pc.any(missing).as_py():
        absent = ex_ids.filter(missing).to_pylist()
        raise TrainError(
            f"{len(absent)} examples have no reference score (e.g. ids {', '.join(absent[:3])}): "
            f"the cache does not cover this dataset; {fix}"
        )
    if len(sc_ids) != len(ex_ids):
        raise TrainError(f"the cache has {len(sc_ids)} scores for {len(ex_ids)} examples: {fix}")
    scores = scores.take(position)
    for side in ("chosen", "rejected"):
        differs = pc.not_equal(examples.column(f"{side}_tokens"), scores.column(f"{side}_tokens"))
        if pc.any(differs).as_py():
            bad = ex_ids.filter(differs).to_pylist()
            raise TrainError(
                f"{len(bad)} examples have a different {side} token count in the cache than in the "
                f"dataset (e.g. id {bad[0]}): the cache was computed from other token ids; {fix}"
            )
    splits = {}
    for name in ("train", "eval"):
        keep = pc.equal(examples.column("split"), name)
        ex, sc = examples.filter(keep), scores.filter(keep)
        splits[name] = Split(
            ex.column("id").to_pylist(),
            ex.column("prompt_ids").to_pylist(),
            ex.column("chosen_ids").to_pylist(),
            ex.column("rejected_ids").to_pylist(),
            torch.tensor(sc.column("chosen_logp").to_numpy(), dtype=torch.float64),
            torch.tensor(sc.column("rejected_logp").to_numpy(), dtype=torch.float64),
        )
    return splits, cache


# --- helpers -------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of train.lr at optimizer step ``step`` (0-based): linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Pairs of optimizer step ``step``: a seeded permutation per epoch, consumed in order."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        out.append(int(_permutation(seed, epoch, n)[offset]))
    return out


_PERMUTATIONS: dict = {}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMUTATIONS[key]


def compute_loss(cfg: Config, split: Split, index: list[int], policy_chosen, policy_rejected, scale: float):
    """Loss of a micro-batch (scaled by ``scale``) and the per-pair sums of its metrics."""
    t = cfg.train
    ref_chosen = split.ref_chosen[index].to(policy_chosen.device, torch.float32)
    ref_rejected = split.ref_rejected[index].to(policy_chosen.device, torch.float32)
    loss_fn = LOSSES[t.loss]
    pc_, pr_, rc_, rr_ = policy_chosen, policy_rejected, ref_chosen, ref_rejected
    chosen_len = torch.tensor([len(split.chosens[i]) for i in index], device=pc_.device, dtype=torch.float32)
    if loss_fn.length_normalized:
        rejected_len = torch.tensor([len(split.rejecteds[i]) for i in index], device=pc_.device, dtype=torch.float32)
        pc_, rc_, pr_, rr_ = pc_ / chosen_len, rc_ / chosen_len, pr_ / rejected_len, rr_ / rejected_len
    per_pair = loss_fn.fn(pc_, pr_, rc_, rr_, t.beta, t.label_smoothing)
    if t.sft_weight:
        per_pair = per_pair + t.sft_weight * (-policy_chosen / chosen_len)
    reward_chosen, reward_rejected = rewards(pc_, rc_, t.beta), rewards(pr_, rr_, t.beta)
    sums = {
        "loss": per_pair.detach().sum().item(),
        "rewards/chosen": reward_chosen.detach().sum().item(),
        "rewards/rejected": reward_rejected.detach().sum().item(),
        "rewards/accuracies": (reward_chosen > reward_rejected).float().sum().item(),
        "rewards/margins": (reward_chosen - reward_rejected).detach().sum().item(),
        "logps/chosen": policy_chosen.detach().sum().item(),
        "logps/rejected": policy_rejected.detach().sum().item(),
    }
    return per_pair.sum() * scale, sums


def _tokens(split: Split, index: list[int]) -> int:
    return sum(2 * len(split.prompts[i]) + len(split.chosens[i]) + len(split.rejecteds[i]) for i in index)


class _Trainer:
    """The state of one run: policy, optimizer, data, where to write."""

    def __init__(self, cfg: Config, policy, splits: dict[str, Split], run_dir: Path, device: str, autocast):
        self.cfg, self.policy, self.splits, self.run_dir = cfg, policy, splits, run_dir
        self.device, self.autocast = device, autocast
        self.shared = supports_shared_prefix(policy)
        t = cfg.train
        self.micro = t.batch_size // t.grad_accum

    def pair_logps(self, split: Split, index: list[int]):
        with self.autocast():
            return pair_logps(
                self.policy,
                [split.prompts[i] for i in index],
                [split.chosens[i] for i in index],
                [split.rejecteds[i] for i in index],
                shared=self.shared,
                device=self.device,
            )

    def evaluate(self, step: int) -> dict:
        split = self.splits["eval"]
        if not len(split):
            return {}
        self.policy.eval()
        totals: dict = {}
        with torch.no_grad():
            for start in range(0, len(split), self.micro):
                index = list(range(start, min(start + self.micro, len(split))))
                chosen, rejected = self.pair_logps(split, index)
                _, sums = compute_loss(self.cfg, split, index, chosen.float(), rejected.float(), 1.0)
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + value
        self.policy.train()
        return {"step": step, **{f"eval/{k}": v / len(split) for k, v in totals.items()}}


def step0_check(trainer: _Trainer, cfg: Config, cache: dict, cache_dir: Path) -> dict:
    """Compare the policy's log-probs on the first batch with the cache (policy == reference)."""
    split = trainer.splits["train"]
    index = batch_indices(0, cfg.train.batch_size, len(split), cfg.train.seed)[: trainer.micro]
    tolerance = cfg.train.step0_tolerance or logprob_tolerance(
        (cfg.model.dtype, cache["inputs"]["dtype"]), cache["inputs"]["backend"]
    )
    trainer.policy.eval()
    with torch.no_grad():
        chosen, rejected = trainer.pair_logps(split, index)
    trainer.policy.train()
    tokens = torch.tensor([len(split.chosens[i]) + len(split.rejecteds[i]) for i in index], dtype=torch.float64)
    diff = (chosen.double().cpu() - split.ref_chosen[index]).abs() + (rejected.double().cpu() - split.ref_rejected[index]).abs()
    # Per-token mean |diff| of each pair, bounded below by the per-sequence evidence.
    per_token = float((diff / tokens).max())
    per_sequence = float(diff.max())
    report = {"step0/max_seq_diff": per_sequence, "step0/max_mean_token_diff": per_token, "step0/tolerance": tolerance}
    message = (
        f"step-0 check: policy log-probs differ from the cache {cache_dir.name[:12]} by up to "
        f"{per_token:.3g} nats/token ({per_sequence:.3g} per sequence); tolerance {tolerance:g}"
    )
    if per_token > tolerance:
        hint = (
            "The policy starts from the reference weights, so they must agree: the cache is stale "
            "or was computed from other token ids. Rescore with `dpo score -c CONFIG`, or set "
            "train.step0_check=warn to go on anyway"
        )
        if cfg.train.step0_check == "error":
            raise TrainError(f"{message}. {hint}")
        log.warning("%s. %s", message, hint)
    else:
        log.info("%s: ok", message)
    return report


# --- the stage -----------------------------------------------------------------------------------


def run_fingerprint_inputs(cfg: Config, dataset_fp: str, cache_fp: str, init_fp: dict) -> dict:
    train = dataclasses.asdict(cfg.train)
    for key in ("run_name", "ref_cache", "eval_every", "save_every", "keep_checkpoints", "step0_check"):
        train.pop(key)
    return {"kind": "run", "dataset": dataset_fp, "refscores": cache_fp, "init": init_fp,
            "dtype": cfg.model.dtype, "train": train}  # fmt: skip


def _init_model(cfg: Config) -> ModelConfig:
    return ModelConfig(path=cfg.train.init_from or cfg.model.path, dtype="float32",
                       trust_remote_code=cfg.model.trust_remote_code)  # fmt: skip


def run_identity(cfg: Config, dataset_fp: str, cache_fp: str, init_fp: dict) -> tuple[str, Path]:
    """(run fingerprint, run directory)."""
    run_fp = fingerprint(run_fingerprint_inputs(cfg, dataset_fp, cache_fp, init_fp))
    return run_fp, Path(cfg.storage) / "runs" / (cfg.train.run_name or f"dpo-{run_fp[:12]}")


def plan_run_dir(cfg: Config, dataset_fp: str, cache_dir: Path) -> Path:
    """Where the train stage puts (or put) the run for ``cfg`` and this reference cache."""
    manifest = read_manifest(cache_dir)
    cache_fp = manifest["fingerprint"] if manifest else cache_dir.name
    return run_identity(cfg, dataset_fp, cache_fp, model_fingerprint(_init_model(cfg)))[1]


def _device(cfg: Config) -> str:
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device=cuda but no CUDA GPU is visible: use train.device=auto")
    return device


def train(cfg: Config, resume: bool = False, show_progress: bool = True) -> TrainResult:
    t = cfg.train
    if cfg.model.dtype == "float16":
        raise TrainError("model.dtype=float16 is not supported for training: use bfloat16 or float32")
    # 1. Inputs and their contract.
    dataset_dir = locate_dataset(cfg)
    dataset_fp = read_manifest(dataset_dir)["fingerprint"]
    cache_dir = locate_ref_cache(cfg, dataset_fp)
    splits, cache = load_split_data(dataset_dir, cache_dir)
    if not len(splits["train"]):
        raise TrainError(f"the dataset {dataset_dir} has no train examples")
    init_cfg = _init_model(cfg)
    init_fp = model_fingerprint(init_cfg)
    run_fp, run_dir = run_identity(cfg, dataset_fp, cache["fingerprint"], init_fp)
    previous = read_manifest_run(run_dir)
    if previous and previous.get("complete"):
        if previous["fingerprint"] != run_fp:
            raise TrainError(f"{run_dir} holds a finished run of another configuration: set another train.run_name")
        log.info("train: up to date, %s", run_dir)
        return TrainResult(run_dir, previous, skipped=True)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not resume:
        raise TrainError(
            f"{run_dir} has checkpoints of an unfinished run: pass --resume to continue it, or "
            "delete the folder or set another train.run_name to start over"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    total_steps = t.max_steps or math.ceil(t.epochs * len(splits["train"]) / t.batch_size)

    # 2. Exactly one model: the policy.
    device = _device(cfg)
    torch.manual_seed(t.seed)
    policy = load_causal_lm(init_cfg, device)
    policy.train()
    if t.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    half = {"bfloat16": torch.bfloat16}.get(cfg.model.dtype)
    # Master weights stay float32; bfloat16 runs the forward/backward under autocast.
    autocast = (lambda: torch.autocast(device_type=device, dtype=half)) if half else contextlib.nullcontext
    optimizer = torch.optim.AdamW(policy.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, t.warmup_steps, total_steps, t.schedule)
    )
    trainer = _Trainer(cfg, policy, splits, run_dir, device, autocast)
    metrics_path = run_dir / "metrics.jsonl"

    start_step = 0
    if resume and checkpoints:
        state = load_checkpoint(checkpoints[-1], policy, optimizer, scheduler)
        start_step = state["step"]
        if state["run_fingerprint"] != run_fp:
            raise TrainError(f"the checkpoint {checkpoints[-1]} belongs to another configuration")
        _truncate_metrics(metrics_path, start_step)
        log.info("train: resumed from %s (step %d of %d)", checkpoints[-1].name, start_step, total_steps)
    else:
        metrics_path.unlink(missing_ok=True)
        if init_fp == cache["inputs"]["model"] and t.step0_check != "off":
            report = step0_check(trainer, cfg, cache, cache_dir)
            _append(metrics_path, {"step": 0, **report})
        elif t.step0_check != "off":
            log.info("train: policy starts from other weights than the reference; no step-0 check")
        eval_metrics = trainer.evaluate(0)
        if eval_metrics:
            _append(metrics_path, eval_metrics)

    # 4. The loop.
    from tqdm.auto import tqdm

    train_split = splits["train"]
    bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", file=sys.stderr,
               disable=not show_progress, dynamic_ncols=True)  # fmt: skip
    last_eval = None
    with bar:
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            index = batch_indices(step, t.batch_size, len(train_split), t.seed)
            totals: dict = {}
            for micro in range(t.grad_accum):
                micro_index = index[micro * trainer.micro : (micro + 1) * trainer.micro]
                chosen, rejected = trainer.pair_logps(train_split, micro_index)
                # Sum of per-pair losses / batch_size: the micro-batch gradients add up to the
                # gradient of the mean loss over the whole batch.
                loss, sums = compute_loss(cfg, train_split, micro_index, chosen.float(), rejected.float(),
                                          1.0 / t.batch_size)  # fmt: skip
                loss.backward()
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + value
            grad_norm = torch.nn.utils.clip_grad_norm_(
                policy.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
            )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - started
            record = {"step": step + 1, "epoch": (step + 1) * t.batch_size / len(train_split),
                      **{k: v / t.batch_size for k, v in totals.items()},
                      "grad_norm": float(grad_norm), "lr": lr,
                      "tokens/s": _tokens(train_split, index) / seconds, "seconds": seconds}  # fmt: skip
            _append(metrics_path, record)
            bar.update(1)
            bar.set_postfix_str(
                f"loss {record['loss']:.4f} acc {record['rewards/accuracies']:.2f} lr {lr:.2e} "
                f"{record['tokens/s']:,.0f} tok/s",
                refresh=False,
            )
            done = step + 1
            if t.eval_every and done % t.eval_every == 0 and done < total_steps:
                last_eval = trainer.evaluate(done)
                if last_eval:
                    _append(metrics_path, last_eval)
                    log.info("eval step %d: loss %.4f, reward accuracy %.3f", done,
                             last_eval["eval/loss"], last_eval["eval/rewards/accuracies"])  # fmt: skip
            if t.save_every and done % t.save_every == 0 and done < total_steps:
                state = {"step": done, "pairs_consumed": done * t.batch_size, "run_fingerprint": run_fp,
                         "total_steps": total_steps}  # fmt: skip
                save_checkpoint(checkpoint_dir(run_dir, done), policy, optimizer, scheduler, state)
                prune_checkpoints(run_dir, t.keep_checkpoints)

    # 5. Final eval, weights, summary.
    last_eval = trainer.evaluate(total_steps)
    if last_eval:
        _append(metrics_path, last_eval)
    final = run_dir / "final"
    policy.save_pretrained(final, safe_serialization=True)
    load_tokenizer(cfg.model).save_pretrained(final)
    first_eval = next((r for r in _read_metrics(metrics_path) if r["step"] == 0 and "eval/loss" in r), None)
    summary = {
        "kind": "run",
        "fingerprint": run_fp,
        "inputs": run_fingerprint_inputs(cfg, dataset_fp, cache["fingerprint"], init_fp),
        "dataset_dir": str(dataset_dir),
        "refscores_dir": str(cache_dir),
        "steps": total_steps,
        "train_examples": len(train_split),
        "eval_examples": len(splits["eval"]),
        "first_eval": first_eval,
        "final_eval": last_eval,
        "final_dir": str(final),
        "complete": True,
    }
    atomic_write_json(run_dir / "run.json", summary)
    return TrainResult(run_dir, summary, skipped=False)


def read_manifest_run(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop what a killed run logged after the checkpoint it resumes from."""
    kept = [r for r in _read_metrics(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

