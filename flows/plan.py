"""Where each stage's output is for a config, and whether it is complete: what the flow skips
and what `dpo status` shows. No Prefect here, so `dpo status` starts fast."""

from __future__ import annotations

from pathlib import Path

from pipeline.storage import layout
from pipeline.audit.report import current_full_audit
from pipeline.config.schema import Config


def plan(cfg: Config) -> dict[str, Path]:
    """The output directory of every stage for this config (the audit's: the cache it checks)."""
    return planned_run(cfg)[0]


def planned_run(cfg: Config) -> tuple[dict[str, Path], str]:
    """plan(cfg), and the fingerprint of the run it places (what decides its weights)."""
    # With data.path gone, the later stages still find the dataset prepared from it.
    dataset_dir = layout.plan_dataset_dir(cfg) if layout.source_exists(cfg) else layout.locate_dataset(cfg)
    refscores_dir = layout.plan_refscores_dir(cfg, dataset_dir.name)
    cache_dir = Path(cfg.train.ref_cache) if cfg.train.ref_cache else refscores_dir
    # a reference-free run reads no cache (train.needs_reference() false): none in its identity
    run_fp, run_dir = layout.plan_run(cfg, dataset_dir.name, cache_dir if cfg.train.needs_reference() else None)
    return {"prepare": dataset_dir, "score": refscores_dir, "audit": cache_dir, "train": run_dir}, run_fp


def stage_problem(cfg: Config, stage: str, directory: Path) -> str | None:
    """None when the stage's output exists, is complete and its files match their manifest (a
    reference cache: every value proven too; the audit: a passed full audit of exactly the bytes
    of the cache on disk now); else what is wrong, naming the file where one is to blame."""
    check = {"prepare": layout.verified_dataset, "score": layout.proven_refscores}.get(stage)
    if check is not None:
        try:
            check(directory)
        except layout.CacheError as exc:
            return str(exc)
        return None
    if stage == "audit":
        found = current_full_audit(directory, cfg.audit.rescore_rows) is not None
        return None if found else "no passed full audit of the cache as it is now"
    return None if layout.verified_run(directory) is not None else "not finished"


def stage_complete(cfg: Config, stage: str, directory: Path) -> bool:
    """Whether the stage's output is complete and verified (stage_problem says why not)."""
    return stage_problem(cfg, stage, directory) is None
