"""Where each stage's output is for a config, and whether it is complete: what the flow skips
and what `dpo status` shows. No Prefect here, so `dpo status` starts fast."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pipeline.audit.report import current_full_audit
from pipeline.config.schema import Config
from pipeline.errors import CacheError
from pipeline.storage import locate, trust


def plan(cfg: Config) -> dict[str, Path]:
    """The output directory of every stage for this config (the audit's: the cache it checks)."""
    return planned_run(cfg)[0]


def planned_run(cfg: Config) -> tuple[dict[str, Path], str]:
    """plan(cfg), and the fingerprint of the run it places (what decides its weights)."""
    # With data.path gone, the later stages still find the dataset prepared from it.
    dataset_dir = locate.dataset_dir_for(cfg) if locate.source_exists(cfg) else locate.find_dataset(cfg)
    refscores_dir = locate.refscores_dir_for(cfg, dataset_dir.name)
    cache_dir = Path(cfg.train.ref_cache) if cfg.train.ref_cache else refscores_dir
    # a reference-free run reads no cache (train.needs_reference() false): none in its identity
    run = locate.run_dir_for(cfg, dataset_dir.name, cache_dir if cfg.train.needs_reference() else None)
    return {"prepare": dataset_dir, "score": refscores_dir, "audit": cache_dir, "train": run.path}, run.fingerprint


def stage_problem(cfg: Config, stage: str, directory: Path) -> str | None:
    """None when the stage's output exists, is complete and its files match their manifest (a
    reference cache: every value proven too; the audit: a passed full audit of exactly the bytes
    of the cache on disk now); else what is wrong, naming the file where one is to blame."""
    check = {"prepare": trust.verified_dataset, "score": partial(trust.verified_refscores, values=True)}.get(stage)
    if check is not None:
        try:
            check(directory)
        except CacheError as exc:
            return str(exc)
        return None
    if stage == "audit":
        found = current_full_audit(directory, cfg.audit.rescore_rows) is not None
        return None if found else "no passed full audit of the cache as it is now"
    return None if trust.verified_run(directory) is not None else "not finished"


def stage_complete(cfg: Config, stage: str, directory: Path) -> bool:
    """Whether the stage's output is complete and verified (stage_problem says why not)."""
    return stage_problem(cfg, stage, directory) is None
