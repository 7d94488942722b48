"""The train stage: DPO with only the policy in memory, reading cached reference log-probs.

    result = train(load_config("run.yaml"))          # or: dpo train -c run.yaml [--resume]
    result.run_dir  # <storage>/runs/<run name>/ with config.yaml, metrics.jsonl, checkpoints/,
                    # final/ (save_pretrained, safetensors + tokenizer), run.json

``train`` is setup, then a loop over ``train_step`` (the benchmark calls the same step):
  1. find the prepared dataset and its reference cache (both verified against their manifests),
     and check the contract between them (dataset fingerprint, every id scored, token counts
     equal): refuse on any mismatch (train_data.py);
  2. take the run's lock (a second `dpo train` of the same run name refuses, naming the holder);
  3. load exactly one model, the policy (model.path, or train.init_from), with LoRA adapters
     when train.peft is set (pipeline/models/adapters.py);
  4. step-0 check: a policy that starts from the reference weights must reproduce the cached
     log-probs on the first batch (rewards 0, loss ln 2);
  5. each ``train_step`` (train_step.py): the step's pairs in micro-batches (trainer.py: by pairs, or by
     tokens with train.micro_batch_tokens), each ONE forward pass over prompt + chosen + rejected (the prompt
     computed once; several pairs per row without padding, see logprobs.pack_pairs), loss scaled so the sum of
     micro-batch gradients is the gradient of the mean over the whole batch (train_loss.py); clip, AdamW step
     (skipped on the device after a non-finite loss or gradient norm), schedule; no host sync: each logged step
     reads the metrics of the steps since the last (one transfer) to metrics.jsonl (metrics.py), and stops
     the run if one was non-finite; eval and checkpoints (checkpoint.py) on their cadence;
  6. final eval, final/ and run.json (with the sha256 of every file in final/: final.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.models import adapters, compiling, precision
from pipeline.train import distributed, final
from pipeline.storage import layout, metrics
from pipeline.train.checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    restore_training,
    save_training,
)
from pipeline.config.schema import Config, world_size
from pipeline.train.distributed import World
from pipeline.train.final import TrainResult, finished
from pipeline.train.launch import torchrun
from pipeline.models.loading import load_causal_lm, model_fingerprint
from pipeline.progress import Progress
from pipeline.store import atomic_write_text, ensure_dir, exclusive, lock_path, remove_leftovers
from pipeline.train.trackers import TrackerError, open_trackers
from pipeline.train.batches import Split, TrainError, batch_indices, load_split_data
from pipeline.train.step import read_records, train_step
from pipeline.train.trainer import Trainer, build_trainer

log = logging.getLogger("dpo.train")


def step0_check(trainer: Trainer, cfg: Config, cache: dict, cache_dir: Path) -> dict:
    """Compare the policy's log-probs on the first batch with the cache (policy == reference)."""
    split = trainer.splits["train"]
    index = trainer.micro_batch(batch_indices(0, trainer.batch, len(split), cfg.train.seed), 0)
    tolerance = cfg.train.step0_tolerance
    if tolerance is None:
        compute = precision.compute_dtype(precision.resolve(cfg))
        tolerance = layout.logprob_tolerance((compute, cache["inputs"]["dtype"]), cache["inputs"]["backend"])
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
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device=cuda but no CUDA GPU is visible: use train.device=auto")
    return device


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


def _plan_run(cfg: Config) -> _Run:
    dataset_dir, dataset_fp, cache_dir, init_fp, run_fp, run_dir = _identify(cfg)
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
    identity = layout.run_identity(cfg, dataset_fp, None if cache is None else cache["fingerprint"], init_fp)
    return _Run(dataset_dir, cache_dir, cache, splits, init_fp, identity, run_fp, run_dir)


def _identify(cfg: Config):
    """(dataset dir, its fingerprint, cache dir, init fingerprint, run fingerprint, run dir); the
    cache dir is None for a reference-free run (no cache is looked for, and none is named in
    the run's identity)."""
    dataset_dir = layout.locate_dataset(cfg)
    dataset_fp = layout.verified_dataset(dataset_dir)["fingerprint"]
    cache_dir = cache_fp = None
    if cfg.train.needs_reference():
        cache_dir = layout.locate_ref_cache(cfg, dataset_fp)
        cache_fp = layout.verified_refscores(cache_dir)["fingerprint"]
    init_fp = model_fingerprint(layout.policy_init(cfg))
    run_fp, run_dir = layout.run_dir_for(cfg, dataset_fp, cache_fp, init_fp)
    return dataset_dir, dataset_fp, cache_dir, init_fp, run_fp, run_dir


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
    *_, run_fp, run_dir = _identify(cfg)
    return finished(run_dir, run_fp, quiet=True)


def train(cfg: Config, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train one run (see the module docstring). Under torchrun every rank calls this: rank 0
    writes, all compute; with train.nproc_per_node > 1 outside torchrun, use ``dpo train``,
    which starts torchrun (launch.torchrun)."""
    if cfg.model.dtype == "float16" and cfg.train.precision is None:
        raise TrainError("model.dtype=float16 is not supported for training: use bfloat16 or float32")
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
    run = _plan_run(cfg)
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
                f"{run.run_dir} has checkpoints of an unfinished run: pass --resume to continue it, "
                "or delete the folder or set another train.run_name to start over"
            )
        if world.main:
            ensure_dir(run.run_dir)
            for folder in (run.run_dir, run.run_dir / "checkpoints"):
                remove_leftovers(folder)  # of a killed run; we hold the lock
            atomic_write_text(run.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        torch.manual_seed(cfg.train.seed)
        policy = load_causal_lm(layout.policy_init(cfg), device).train()
        if cfg.train.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.peft is not None:  # LoRA: only the adapters train (B = 0: still the reference)
            policy = adapters.with_lora(policy, cfg.train.peft)
        trainer = build_trainer(cfg, run.splits, policy, world)
        if world.main:
            try:
                trainer.trackers = open_trackers(cfg.train.report_to, run.run_dir, cfg.to_dict())
            except TrackerError as exc:
                raise TrainError(str(exc)) from None
        try:
            start_step = _start(trainer, run, resume and bool(checkpoints))
            last_eval = _loop(trainer, run, start_step, show_progress)
            return _finish(trainer, run, last_eval)
        finally:
            trainer.trackers.close()


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


def _start(trainer: Trainer, run: _Run, resume: bool) -> int:
    """Resume from the newest loadable checkpoint, or start: step-0 check and first eval."""
    metrics_path = metrics.path_of(run.run_dir)
    if resume:
        loaded = load_latest_checkpoint(run.run_dir, functools.partial(restore_training, trainer))
        if loaded is None:
            raise TrainError(
                f"no checkpoint of {run.run_dir} can be loaded (all are damaged): delete the folder "
                "(or set another train.run_name) and train again"
            )
        path, state = loaded
        if state.get("run_fingerprint") != run.fingerprint:
            raise TrainError(f"the checkpoint {path} belongs to another configuration")
        if trainer.world.main:
            metrics.truncate(metrics_path, state["step"])
        log.info("train: resumed from %s (step %d of %d)", path.name, state["step"], trainer.total_steps)
        return state["step"]
    if trainer.world.main:
        metrics_path.unlink(missing_ok=True)
    cfg = trainer.cfg
    if run.cache is None:
        log.info("train: loss_type %s is reference-free: no reference cache, so no step-0 check",
                 "+".join(cfg.train.loss_names()))
    elif run.init_fp == run.cache["inputs"]["model"] and cfg.train.step0_check != "off":
        trainer.log(metrics_path, {"step": 0, **step0_check(trainer, cfg, run.cache, run.cache_dir)})
    elif cfg.train.step0_check != "off":
        log.info("train: policy starts from other weights than the reference; no step-0 check")
    first_eval = trainer.evaluate(0)
    if first_eval:
        trainer.log(metrics_path, first_eval)
    return 0


def _loop(trainer: Trainer, run: _Run, start_step: int, show_progress: bool) -> dict:
    train_cfg, total = trainer.cfg.train, trainer.total_steps
    metrics_path = metrics.path_of(run.run_dir)
    bar = Progress(total, "train", "steps", show_progress, log if trainer.world.main else logging.getLogger("dpo.quiet"),
                   initial=start_step,
                   mininterval=10 if trainer.world.size > 1 else 0.1)  # torchrun's tee prints each refresh
    last_eval: dict = {}
    window: list[dict] = []  # step records since the last logged one (train.logging_steps), on the device
    first_graphs = None  # graphs compiled by the end of the first step (train.torch_compile)
    with bar:
        started = time.perf_counter()  # of the window's training time (eval and saving left out)
        for step in range(start_step, total):
            window.append(train_step(trainer, step))
            if trainer.compiled and first_graphs is None:
                first_graphs = compiling.graphs_compiled()
            bar.update(1)
            done = step + 1
            saving = train_cfg.save_steps and done % train_cfg.save_steps == 0 and done < total
            evaluating = train_cfg.eval_steps and done % train_cfg.eval_steps == 0 and done < total
            if done % train_cfg.logging_steps == 0 or done == total or saving:
                records = read_records(trainer, window, time.perf_counter() - started)  # the one host sync
                record = metrics.averaged(records)
                if trainer.compiled:
                    graphs = compiling.graphs_compiled()
                    record.update({"compile/graphs": graphs, "compile/recompiles": graphs - first_graphs})
                trainer.log(metrics_path, record)
                bar.set_postfix_str(f"loss {record['loss']:.4f} acc {record['rewards/accuracies']:.2f} "
                                    f"lr {record['learning_rate']:.2e} {record['tokens/s']:,.0f} tok/s", refresh=False)
                window = []
            elif evaluating:
                read_records(trainer, [])  # the guard: no eval of a run that has stopped
            paused = time.perf_counter()
            if evaluating:
                last_eval = trainer.evaluate(done)
                if last_eval:
                    trainer.log(metrics_path, last_eval)
                    log.info("eval step %d: loss %.4f, reward accuracy %.3f", done,
                             last_eval["eval/loss"], last_eval["eval/rewards/accuracies"])
            if saving:
                save_training(trainer, run.run_dir, done, run.fingerprint)
            started = time.perf_counter() if not window else started + (time.perf_counter() - paused)
    return last_eval


def _finish(trainer: Trainer, run: _Run, last_eval: dict) -> TrainResult:
    """Final eval, final/ (weights + tokenizer) and run.json, which lists final/'s sha256s."""
    metrics_path = metrics.path_of(run.run_dir)
    last_eval = trainer.evaluate(trainer.total_steps)
    if last_eval:
        trainer.log(metrics_path, last_eval)
    policy = final.whole_policy(trainer)  # a collective under FSDP2
    if trainer.world.main:
        summary = final.write_final(trainer, run, policy, last_eval)
    return TrainResult(run.run_dir, trainer.world.broadcast(summary if trainer.world.main else None), skipped=False)
