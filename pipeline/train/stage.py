"""The train stage: DPO with only the policy in memory, reading cached reference log-probs.

    result = train(load_config("run.yaml"))          # or: dpo train -c run.yaml [--resume]
    result.run_dir  # <storage>/runs/<run name>/ with config.yaml, metrics.jsonl, checkpoints/,
                    # final/ (save_pretrained, safetensors + tokenizer), run.json

``train`` is setup, then a loop over ``Trainer.train_step`` (the benchmark calls the same step):
  1. find the prepared dataset and its reference cache (both verified against their manifests),
     and check the contract between them (dataset fingerprint, every id scored, token counts
     equal): refuse on any mismatch (batches.py);
  2. take the run's lock (a second `dpo train` of the same run name refuses, naming the holder);
  3. load exactly one model, the policy (model.path, or train.init_from), with LoRA adapters
     when train.peft is set (pipeline/models/adapters.py);
  4. step-0 check: a policy that starts from the reference weights must reproduce the cached
     log-probs on the first batch (rewards 0, loss ln 2);
  5. each ``Trainer.train_step`` (trainer.py): the step's pairs in micro-batches (by pairs, or by tokens with
     train.micro_batch_tokens), each ONE forward pass over prompt + chosen + rejected (the prompt computed once;
     several pairs per row without padding, see logprobs.pack_pairs), loss scaled so the sum of micro-batch
     gradients is the gradient of the mean over the whole batch (loss.py, logprobs/objective.py); clip, AdamW
     step (skipped on the device after a non-finite loss or gradient norm), schedule (schedule.py); no host
     sync. Then the parts that own the cadences: the metrics log (metrics_log.py) reads the metrics of the
     steps since the last logged one (one transfer) to metrics.jsonl, and stops the run if one was
     non-finite; the evaluator (evaluator.py) and the checkpointer (checkpointer.py) run when due;
  6. final eval, final/ and run.json (with the sha256 of every file in final/: final.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.config.schema import Config, world_size
from pipeline.errors import TrainError
from pipeline.models import adapters, precision
from pipeline.models.loading import load_causal_lm, pick_device
from pipeline.storage import locate, paths, trust
from pipeline.store import atomic_write_text, ensure_dir, exclusive, lock_path, remove_leftovers
from pipeline.train import distributed, final
from pipeline.train.batches import Split, batch_indices, load_split_data
from pipeline.train.checkpoint import list_checkpoints
from pipeline.train.checkpointer import Checkpointer
from pipeline.train.distributed import World
from pipeline.train.evaluator import Evaluator
from pipeline.train.final import TrainResult, finished
from pipeline.train.launch import torchrun
from pipeline.train.metrics_log import MetricsLog
from pipeline.train.trainer import Trainer, build_trainer

log = logging.getLogger("dpo.train")


def step0_check(trainer: Trainer, cfg: Config, cache: dict, cache_dir: Path) -> dict:
    """Compare the policy's log-probs on the first batch with the cache (policy == reference)."""
    split = trainer.splits["train"]
    index = trainer.micro_batch(batch_indices(0, trainer.batch, len(split), cfg.train.seed), 0)
    tolerance = cfg.train.step0_tolerance
    if tolerance is None:
        compute = precision.compute_dtype(precision.resolve(cfg))
        tolerance = trust.logprob_tolerance((compute, cache["inputs"]["dtype"]), cache["inputs"]["backend"])
    trainer.engine.eval()
    with torch.no_grad():
        chosen, rejected = trainer.pair_logps(split, index)
    trainer.engine.train()
    tokens = torch.tensor([len(split.chosens[i]) + len(split.rejecteds[i]) for i in index], dtype=torch.float64)
    diff = (chosen.double().cpu() - split.ref_chosen[index]).abs() + (rejected.double().cpu() - split.ref_rejected[index]).abs()
    # Per-token mean |diff| of each pair, bounded below by the per-sequence evidence.
    per_token = trainer.world.max(float((diff / tokens).max()))  # over every rank's first micro-batch
    per_sequence = trainer.world.max(float(diff.max()))
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


def _device(cfg: Config) -> str:
    return pick_device(cfg.train.device, "train.device", TrainError)


@dataclass
class _Run:
    """What a run is: its inputs (verified), its identity and its folder."""

    dataset_dir: Path
    cache_dir: Path | None
    """None for a reference-free run (train.needs_reference() false): no cache is read."""
    cache: dict | None
    splits: dict[str, Split]
    init_fp: dict
    identity: dict
    fingerprint: str
    run_dir: Path


@dataclass
class _Parts:
    """What decides the loop's cadences: when to log, to evaluate, to save."""

    metrics_log: MetricsLog
    evaluator: Evaluator
    checkpointer: Checkpointer


def _resolve_run(cfg: Config) -> _Run:
    dataset_dir, cache_dir, folder = _identify(cfg)
    if cache_dir is None:
        log.info("train: loss_type %s is reference-free: no reference cache is read",
                 "+".join(cfg.train.loss_names()))
    splits, cache = load_split_data(dataset_dir, cache_dir, token_reference=cfg.train.needs_token_reference())
    if not len(splits["train"]):
        raise TrainError(f"the dataset {dataset_dir} has no train examples")
    cut = cfg.train.max_completion_length
    if cut is not None:  # responses cut at training time; reference sums of the kept prefix
        longer = sum(int((np.diff(split.chosens.offsets) > cut).sum() + (np.diff(split.rejecteds.offsets) > cut).sum())
                     for split in splits.values())
        splits = {name: split.truncated(cut) for name, split in splits.items()}
        log.info("train: max_completion_length %d: %d responses cut", cut, longer)
    return _Run(dataset_dir, cache_dir, cache, splits, folder.identity["init"], folder.identity, folder.fingerprint,
                folder.path)


def _identify(cfg: Config) -> tuple[Path, Path | None, locate.RunFolder]:
    """(dataset dir, cache dir, the run's folder); the cache dir is None for a reference-free run
    (no cache is looked for, and none is named in the run's identity)."""
    dataset_dir = locate.find_dataset(cfg)
    dataset_fp = trust.verified_dataset(dataset_dir)["fingerprint"]
    cache_dir = locate.find_refscores(cfg, dataset_fp) if cfg.train.needs_reference() else None
    return dataset_dir, cache_dir, locate.run_dir_for(cfg, dataset_fp, cache_dir)


def launch(cfg: Config, argv: list[str], log_dir: Path, **options) -> TrainResult:
    """Train ``cfg`` as train.nproc_per_node processes under torchrun (``launch.torchrun``
    running ``python <argv>`` in each) and return the finished run. A rank that crashes after
    the run is complete and verified (run.json and the sha256 of every file in final/: seen
    once, a gloo rank aborting at exit) is reported, not fatal; any other failure raises."""
    try:
        torchrun(argv, cfg.train.nproc_per_node, log_dir, **options)
    except distributed.DistributedError as exc:
        done = finished_run(cfg)
        if done is None:
            raise
        log.warning("train: the run is complete and verifies, but a process failed as it ended: %s",
                    str(exc).splitlines()[0])
        return TrainResult(done.run_dir, done.summary, skipped=False)
    done = finished_run(cfg)
    if done is None:
        raise TrainError(f"torchrun finished but the run is not complete; see the logs in {log_dir}")
    return TrainResult(done.run_dir, done.summary, skipped=False)


def finished_run(cfg: Config) -> TrainResult | None:
    """The finished run of ``cfg`` when it exists and verifies, without loading data or model
    (what a launcher reports after its torchrun child, or before starting one)."""
    folder = _identify(cfg)[2]
    return finished(folder.path, folder.fingerprint, quiet=True)


def train(cfg: Config, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train one run (see the module docstring). Under torchrun every rank calls this: rank 0
    writes, all compute; with train.nproc_per_node > 1 outside torchrun, use ``dpo train``,
    which starts torchrun (launch.torchrun)."""
    if cfg.model.dtype == "float16" and cfg.train.precision is None:
        raise TrainError("model.dtype=float16 is not supported for training", hint="use bfloat16 or float32")
    device = _device(cfg)
    try:
        world = distributed.start(world_size(cfg.train), device)
    except distributed.DistributedError as exc:
        raise TrainError(str(exc)) from None
    try:
        result = _train(cfg, world, distributed.device_of(world, device), resume, show_progress and world.main)
    except BaseException:
        distributed.stop(world, finished=False)
        raise
    distributed.stop(world)
    return result


def _train(cfg: Config, world: World, device: str, resume: bool, show_progress: bool) -> TrainResult:
    run = _resolve_run(cfg)
    done = finished(run.run_dir, run.fingerprint)
    if done is not None:
        return done
    # One writer per run folder: a second `dpo train` with the same run name refuses at once.
    with _run_lock(cfg, run, world):
        done = finished(run.run_dir, run.fingerprint)
        if done is not None:
            return done
        checkpoints = list_checkpoints(run.run_dir)
        if checkpoints and not resume:
            raise TrainError(
                f"{run.run_dir} has checkpoints of an unfinished run", hint="pass --resume to continue it, "
                "or delete the folder or set another train.run_name to start over"
            )
        if world.main:
            ensure_dir(run.run_dir)
            for folder in (run.run_dir, run.run_dir / "checkpoints"):
                remove_leftovers(folder)  # of a killed run; we hold the lock
            atomic_write_text(run.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        torch.manual_seed(cfg.train.seed)
        policy = load_causal_lm(paths.policy_init(cfg), device).train()
        if cfg.train.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.peft is not None:  # LoRA: only the adapters train (B = 0: still the reference)
            policy = adapters.with_lora(policy, cfg.train.peft)
        trainer = build_trainer(cfg, run.splits, policy, world)
        with MetricsLog.opened(trainer, run.run_dir) as metrics_log:  # the trackers closed however it ends
            parts = _Parts(metrics_log, Evaluator(trainer, metrics_log),
                           Checkpointer(trainer, run.run_dir, run.fingerprint, metrics_log))
            start_step = _start(trainer, run, parts, resume and bool(checkpoints))
            _loop(trainer, parts, start_step, show_progress)
            return _finish(trainer, run, parts.evaluator)


@contextlib.contextmanager
def _run_lock(cfg: Config, run: "_Run", world: World):
    """The run's lock, taken by rank 0 without waiting; every rank learns whether it got it."""
    lock = lock_path(cfg.storage, "runs", run.run_dir.name)
    with contextlib.ExitStack() as stack:
        refused = None
        if world.main:
            try:
                stack.enter_context(exclusive(lock, f"run {run.run_dir}", wait=False))
            except Exception as exc:  # LockBusy, StorageError: the other ranks must stop too
                refused = exc
        reason = world.broadcast(None if refused is None else str(refused))
        if refused is not None:
            raise refused
        if reason is not None:
            raise TrainError(f"rank 0 could not lock the run: {reason}")
        yield


def _start(trainer: Trainer, run: _Run, parts: _Parts, resume: bool) -> int:
    """Resume from the newest loadable checkpoint, or start: step-0 check and first eval."""
    if resume:
        step = parts.checkpointer.resume()
        parts.metrics_log.start_at(step)
        return step
    parts.metrics_log.start_at(0)
    cfg = trainer.cfg
    if run.cache is None:
        log.info("train: loss_type %s is reference-free: no reference cache, so no step-0 check",
                 "+".join(cfg.train.loss_names()))
    elif run.init_fp == run.cache["inputs"]["model"] and cfg.train.step0_check != "off":
        parts.metrics_log.write({"step": 0, **step0_check(trainer, cfg, run.cache, run.cache_dir)})
    elif cfg.train.step0_check != "off":
        log.info("train: policy starts from other weights than the reference; no step-0 check")
    parts.evaluator.evaluate(0)
    return 0


def _loop(trainer: Trainer, parts: _Parts, start_step: int, show_progress: bool) -> None:
    """The steps from ``start_step`` to the end: each one trained, then logged, evaluated and saved
    when the parts that own those cadences say so (metrics_log.py, evaluator.py, checkpointer.py)."""
    metrics_log, evaluator, checkpointer = parts.metrics_log, parts.evaluator, parts.checkpointer
    with metrics_log.progress(start_step, show_progress):
        for step in range(start_step, trainer.total_steps):
            record = trainer.train_step(step)  # tensors on the device: nothing read
            metrics_log.after_step(record, flush=checkpointer.due(step + 1))  # a saved step is logged
            evaluator.maybe_evaluate(step + 1)
            checkpointer.maybe_save(step + 1)


def _finish(trainer: Trainer, run: _Run, evaluator: Evaluator) -> TrainResult:
    """Final eval, final/ (weights + tokenizer) and run.json, which lists final/'s sha256s."""
    last_eval = evaluator.evaluate(trainer.total_steps)
    policy = final.whole_policy(trainer)  # a collective under FSDP2
    if trainer.world.main:
        summary = final.write_final(trainer, run, policy, last_eval)
    return TrainResult(run.run_dir, trainer.world.broadcast(summary if trainer.world.main else None), skipped=False)
