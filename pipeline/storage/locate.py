"""Finding each stage's output for a config: where it goes, and the verified one to read.

    locate.dataset_dir_for(cfg)                        # where prepare puts it: nothing is read
    locate.find_dataset(cfg)                           # the verified dataset, or CacheError: what to run
    locate.refscores_dir_for(cfg, dataset_fp)          # where score puts the reference cache
    locate.find_refscores(cfg, dataset_fp)             # the verified cache to train against
    run = locate.run_dir_for(cfg, dataset_fp, cache_dir)   # run.path, run.fingerprint, run.identity

``<x>_dir_for`` computes the folder from the config (the fingerprint of its identity, paths.py)
and checks nothing; ``find_<x>`` returns only an output that verifies (trust.py), falling back
to an equivalent one where the config's own is missing (data.path gone; a cache of the same
weights scored with another backend or dtype). ``run_dir_for`` is the one route to a run's
folder: the train stage and the flows' plan (`dpo status`, sweeps) both take it.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.schema import Config, is_hub_id
from pipeline.data import is_pattern
from pipeline.errors import CacheError
from pipeline.models.loading import model_fingerprint
from pipeline.storage.paths import (
    dataset_dir,
    dataset_identity,
    policy_init,
    refscores_dir,
    refscores_identity,
    run_dir,
    run_identity,
)
from pipeline.storage.trust import is_verified, verified_dataset, verified_refscores
from pipeline.store import MANIFEST, fingerprint, read_json

log = logging.getLogger("dpo.locate")


# --- the prepared dataset -------------------------------------------------------------------------


def dataset_dir_for(cfg: Config) -> Path:
    """Where the prepare stage puts (or put) the dataset for ``cfg``; nothing is written."""
    return dataset_dir(cfg.storage, fingerprint(dataset_identity(cfg)))


def source_exists(cfg: Config) -> bool:
    """Whether data.path can be read: an existing path, a glob pattern matching files, or a Hub
    dataset id."""
    if is_pattern(cfg.data.path):
        return bool(glob.glob(str(cfg.data.path), recursive=True))
    return Path(cfg.data.path).exists() or is_hub_id(cfg.data.path)


def find_dataset(cfg: Config) -> Path:
    """The verified prepared dataset for ``cfg``, or a CacheError that says what to run.

    Found by fingerprint while data.path exists. Later stages only need token ids, so when
    data.path is gone the dataset prepared from that path with the same settings and tokenizer
    files is used, if there is exactly one.
    """
    if not source_exists(cfg):
        return _dataset_without_source(cfg)
    directory = dataset_dir_for(cfg)
    if not is_verified(verified_dataset, directory):
        if directory.exists():
            verified_dataset(directory)  # raises with the reason
        raise CacheError(
            f"no prepared dataset for this configuration ({directory} is missing)", hint="run "
            "`dpo prepare -c CONFIG` with the same config first"
        )
    return directory


def _dataset_without_source(cfg: Config) -> Path:
    wanted = dataset_identity(cfg, data_sha256="(any)")
    matches = []
    for manifest_path in sorted((Path(cfg.storage) / "datasets").glob(f"*/{MANIFEST}")):
        manifest = read_json(manifest_path) or {}
        inputs = dict(manifest.get("inputs") or {}, data_sha256="(any)")
        if inputs == wanted and (manifest.get("source") or {}).get("path") == str(cfg.data.path):
            matches.append(manifest_path.parent)
    matches = [m for m in matches if is_verified(verified_dataset, m)]
    if len(matches) == 1:
        log.info("data.path %s is gone; using the dataset prepared from it: %s", cfg.data.path, matches[0])
        return matches[0]
    if not matches:
        raise CacheError(
            f"data.path {cfg.data.path} does not exist and no dataset prepared from it with these "
            "settings is in storage", hint="set data.path to your preference data and run `dpo prepare`"
        )
    names = ", ".join(m.name[:12] for m in matches)
    raise CacheError(
        f"data.path {cfg.data.path} does not exist and several datasets were prepared from it "
        f"({names})", hint="restore the file, or prepare again"
    )


# --- the reference cache -------------------------------------------------------------------------


def refscores_dir_for(cfg: Config, dataset_fp: str) -> Path:
    """Where the score stage puts (or put) the cache for ``cfg``; nothing is written."""
    from pipeline.logprobs.backends import resolve_backend

    backend = resolve_backend(cfg.score.backend, cfg.model)
    return refscores_dir(cfg.storage, fingerprint(refscores_identity(cfg, dataset_fp, backend)))


def find_refscores(cfg: Config, dataset_fp: str) -> Path:
    """The verified reference cache of this dataset scored by ``model.path`` in ``model.dtype``.

    train.ref_cache names it explicitly; else the cache `dpo score` makes for this config; else
    the one cache of the same dataset (so the same tokenizer) and model weights made with another
    backend or dtype (e.g. vLLM on a GPU machine). A cache of another model is never used: it is
    named instead.
    """
    model_fp = model_fingerprint(cfg.model)
    if cfg.train.ref_cache:
        path = Path(cfg.train.ref_cache)
        manifest = verified_refscores(path)
        _check_reference(path, manifest, dataset_fp, model_fp, cfg)
        return path
    directory = refscores_dir_for(cfg, dataset_fp)
    if directory.is_dir():
        verified_refscores(directory)
        return directory
    same, other = [], []
    for manifest_path in sorted((Path(cfg.storage) / "refscores").glob(f"*/{MANIFEST}")):
        inputs = (read_json(manifest_path) or {}).get("inputs") or {}
        if inputs.get("dataset_fingerprint") == dataset_fp:
            (same if inputs.get("model") == model_fp else other).append((manifest_path.parent, inputs.get("dtype")))
    # Same weights: prefer the config's dtype; another dtype (e.g. a float32 cache for a bfloat16
    # run) is used when it is the only one: the step-0 check's tolerance accounts for it.
    exact = [path for path, dtype in same if dtype == cfg.model.dtype]
    candidates = exact or [path for path, _ in same]
    if len(candidates) == 1:
        verified_refscores(candidates[0])
        log.info("using reference cache %s (same model weights, scored with another backend or dtype)",
                 candidates[0])
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(p.name[:12] for p in candidates)
        raise CacheError(f"several reference caches match this dataset and model ({names}): "
                         "set train.ref_cache to the one to train against")
    hint = ""
    if other:
        names = ", ".join(path.name[:12] for path, _ in other)
        hint = (f" Caches of this dataset scored by other model weights exist ({names}); they are "
                "not used: set model.path to their reference model, or set train.ref_cache explicitly.")
    raise CacheError(f"no reference scores of this dataset by {cfg.model.path}", hint="run `dpo score -c CONFIG` "
                     f"first.{hint}")


def _check_reference(path: Path, manifest: dict, dataset_fp: str, model_fp: dict, cfg: Config) -> None:
    inputs = manifest["inputs"]
    if inputs["dataset_fingerprint"] != dataset_fp:
        raise CacheError(
            f"train.ref_cache {path} was scored on dataset {inputs['dataset_fingerprint'][:12]}, "
            f"but this config's dataset is {dataset_fp[:12]}: rescore with `dpo score -c CONFIG` "
            "or point train.ref_cache at the cache of this dataset"
        )
    if inputs["model"] != model_fp:
        raise CacheError(
            f"train.ref_cache {path} was scored by other weights than model.path "
            f"({cfg.model.path})", hint="set model.path to the reference model it was scored with, or "
            "rescore with `dpo score -c CONFIG`"
        )


# --- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFolder:
    """A run's folder and what decides it: ``identity`` (paths.run_identity), whose fingerprint
    names the folder unless train.run_name does."""

    path: Path
    fingerprint: str
    identity: dict


def run_dir_for(cfg: Config, dataset_fp: str, cache_dir: Path | None) -> RunFolder:
    """The run for ``cfg`` on this dataset and reference cache (None: a reference-free run, which
    reads no cache): where the train stage puts (or put) it. The cache is named by its manifest's
    fingerprint, or by its folder's name before it is scored."""
    cache_fp = None
    if cache_dir is not None:
        manifest = read_json(Path(cache_dir) / MANIFEST)
        cache_fp = manifest.get("fingerprint") if manifest else Path(cache_dir).name
    identity = run_identity(cfg, dataset_fp, cache_fp, model_fingerprint(policy_init(cfg)))
    run_fp = fingerprint(identity)
    return RunFolder(run_dir(cfg.storage, cfg.train.run_name or f"dpo-{run_fp[:12]}"), run_fp, identity)


# --- generate: the prompts and the sampled completions -------------------------------------------


def prompts_dir_for(cfg: Config) -> Path:
    """Where the generate stage puts (or put) the prompts table for ``cfg``; nothing is written
    (a Hub prompts source is resolved, as data.path is)."""
    from pipeline.storage.paths import prompts_dir, prompts_identity

    return prompts_dir(cfg.storage, fingerprint(prompts_identity(cfg)))


def generate_backend(requested: str) -> str:
    """generate.backend resolved: auto is vllm when it imports and a CUDA GPU is present, else
    transformers (whether vLLM really imports is the stage's check)."""
    if requested != "auto":
        return requested
    import torch

    from pipeline.logprobs.backends import vllm_available

    return "vllm" if vllm_available() and torch.cuda.is_available() else "transformers"


def generations_dir_for(cfg: Config, prompts_fp: str) -> Path:
    """Where the generate stage puts (or put) the completions sampled for ``cfg`` from the
    prompts table ``prompts_fp``; nothing is written."""
    from pipeline.storage.paths import generations_dir, generations_identity

    backend = generate_backend(cfg.generate.backend)
    return generations_dir(cfg.storage, fingerprint(generations_identity(cfg, prompts_fp, backend)))
