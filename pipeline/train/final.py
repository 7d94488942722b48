"""The end of a training run: final/ (the trained weights and tokenizer, save_pretrained, or the
LoRA adapter in peft's format), its model card, the run report, and run.json, which lists the
sha256 of every file in final/.

    done = finished(run_dir, run_fingerprint)               # TrainResult of a verified finished run, or None
    policy = whole_policy(trainer)                          # a collective under FSDP2
    summary = write_final(trainer, run, policy, last_eval)  # rank 0

``trainer`` is trainer.py's Trainer, ``run`` the stage's record of the run (_Run: dataset_dir, cache_dir,
splits, identity, fingerprint, run_dir).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.config.schema import Config
from pipeline.errors import TrainError
from pipeline.models import adapters, precision
from pipeline.models.loading import load_causal_lm, load_tokenizer
from pipeline.reports.run_report import write_run_report
from pipeline.storage import metrics, paths, trust
from pipeline.store import atomic_write_json, atomic_write_text, sha256_file
from pipeline.train import distributed

log = logging.getLogger("dpo.train")


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    skipped: bool


def finished(run_dir: Path, run_fp: str, quiet: bool = False) -> TrainResult | None:
    """The finished run in ``run_dir`` when its run.json and final/ verify (None when there is
    none); a finished run of another fingerprint is refused."""
    previous = trust.verified_run(run_dir)
    if previous is None:
        return None
    if previous.get("fingerprint") != run_fp:
        raise TrainError(f"{run_dir} holds a finished run of another configuration", hint="set another train.run_name")
    if not quiet:
        log.info("train: up to date, %s", run_dir)
    return TrainResult(run_dir, previous, skipped=True)


def whole_policy(trainer):
    """The trained policy with whole weights, on rank 0: the policy itself, or under FSDP2 a CPU
    copy loaded with the gathered weights (None on the other ranks)."""
    if trainer.world.size == 1 or trainer.cfg.train.distributed == "ddp":  # whole on every rank
        return trainer.policy
    weights, _ = distributed.full_state(trainer.engine, trainer.optimizer, trainer.world)
    if not trainer.world.main:
        return None
    cfg = trainer.cfg
    policy = load_causal_lm(paths.policy_init(cfg), "cpu")
    if cfg.train.peft is not None:
        policy = adapters.with_lora(policy, cfg.train.peft)
    policy.load_state_dict(weights)
    return policy


def write_final(trainer, run, policy, last_eval: dict) -> dict:
    """final/, its model card, the run report and run.json (returned): rank 0, after the final eval."""
    metrics_path = metrics.path_of(run.run_dir)
    final = run.run_dir / "final"
    policy.to(getattr(torch, precision.save_dtype(trainer.cfg)))  # train.save_dtype
    if trainer.cfg.train.peft is not None:  # the adapter in peft's format (+ final/merged/)
        adapters.save_final(policy, final, load_tokenizer(trainer.cfg.model), trainer.cfg.train.merge_adapter)
    else:
        policy.save_pretrained(final, safe_serialization=True)
        load_tokenizer(trainer.cfg.model).save_pretrained(final)
    records = metrics.read(metrics_path)
    first_eval = next((r for r in records if r["step"] == 0 and "eval/loss" in r), None)
    atomic_write_text(final / "README.md", model_card(trainer.cfg, run, records, first_eval, last_eval))
    write_run_report(run.run_dir, records, trainer.cfg.to_dict(), final=last_eval or {"steps": trainer.total_steps})
    files = {str(p.relative_to(run.run_dir)): sha256_file(p, use_cache=False)
             for p in sorted(final.rglob("*")) if p.is_file()}
    summary = {
        "kind": "run",
        "fingerprint": run.fingerprint,
        "inputs": run.identity,
        "dataset_dir": str(run.dataset_dir),
        "refscores_dir": None if run.cache_dir is None else str(run.cache_dir),
        "steps": trainer.total_steps,
        "train_examples": len(run.splits["train"]),
        "eval_examples": len(run.splits["eval"]),
        "first_eval": first_eval,
        "final_eval": last_eval,
        "final_dir": str(final),
        "files": files,
        # Not in the identity (they change low-order bits only), recorded resolved.
        "settings": {"device": trainer.device, "precision": precision.resolve(trainer.cfg),
                     "autocast_dtype": precision.compute_dtype(precision.resolve(trainer.cfg)),
                     "world_size": trainer.world.size,
                     "distributed": trainer.cfg.train.distributed if trainer.world.size > 1 else None},
        "versions": paths.library_versions(),
        "complete": True,
    }
    atomic_write_json(run.run_dir / paths.RUN_SUMMARY, summary)
    return summary


def model_card(cfg: Config, run, records: list[dict], first_eval: dict | None, last_eval: dict) -> str:
    """final/README.md: a Hugging Face model card (metadata header + what was trained, on what,
    how, with what result)."""
    hub_data = (trust.verified_dataset(run.dataset_dir).get("source") or {}).get("hub") or {}
    header = {"base_model": str(cfg.model.path), "library_name": "peft" if cfg.train.peft else "transformers",
              "tags": ["dpo", "dpo-pipeline"]}
    if hub_data:
        header["datasets"] = [hub_data["hub_id"]]
    step0 = next((r for r in records if "step0/max_mean_token_diff" in r), None)
    reference = ("reference-free (no reference model, no cache" if run.cache_dir is None else
                 f"with reference log-probs precomputed once (cache `{run.cache_dir.name[:12]}`")
    rows = ["| metric | start | end |", "|---|---|---|"]
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        start = (first_eval or {}).get(key)
        rows.append(f"| {key} | {'-' if start is None else f'{start:.4f}'} | {last_eval.get(key, float('nan')):.4f} |")
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {run.run_dir.name}", "",
        f"DPO ({cfg.train.loss_type}, beta {cfg.train.beta}) of `{cfg.model.path}` with "
        f"{'LoRA adapters (r ' + str(cfg.train.peft.r) + ')' if cfg.train.peft else 'full fine-tuning'}, "
        f"trained by dpo-pipeline {reference}, dataset `{run.dataset_dir.name[:12]}`: "
        f"{len(run.splits['train'])} train / {len(run.splits['eval'])} eval pairs).", "",
        "## Eval", "", *rows, "",
    ]
    if step0:
        lines += [f"Step-0 check: the policy reproduced the cached reference log-probs within "
                  f"{step0['step0/max_mean_token_diff']:.3g} nats/token (tolerance {step0['step0/tolerance']:g}).", ""]
    lines += ["## Training configuration", "", "```yaml", yaml.safe_dump({"train": cfg.to_dict()["train"]},
                                                                          sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
