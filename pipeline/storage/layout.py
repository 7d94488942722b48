"""The contract between the stages: where each output lives, what identifies it, when to trust it.

    <storage>/datasets/<fp>/     examples.parquet, rejects.parquet, manifest.json   (prepare)
    <storage>/refscores/<fp>/    part-NNNNN.parquet, manifest.json                  (score)
    <storage>/audits/<cache fp>/ full.json|html, quick.json|html                    (audit)
    <storage>/runs/<run name>/   config.yaml, metrics.jsonl, checkpoints/, final/, run.json (train)
    <storage>/locks/             one lock file per output directory being written

Every stage finds its inputs and its output through this module, and only through it: stages
never import each other. An output directory's name is the fingerprint (sha256) of its
*identity*: everything that determines its bytes, built here by one function per stage, which
the staleness checks reuse. Its manifest records that identity, library versions, per-file
sha256s and a completion flag; readers call ``verified_dataset`` / ``verified_refscores``, which
check presence and sha256 of every file against the manifest before any byte is used.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import re
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.models import precision
from pipeline.models.adapters import is_adapter_dir
from pipeline.config.schema import Config, ConfigError, ModelConfig, is_hub_id, world_size
from pipeline.data import input_sha256, is_pattern, resolve_input
from pipeline.models.loading import model_fingerprint, tokenizer_files
from pipeline.store import MANIFEST, fingerprint, read_json, sha256_verified

log = logging.getLogger("dpo.layout")

# Schema versions: part of each identity, so a format change never reuses an old directory.
DATASET_SCHEMA_VERSION = 2  # 2: the tokenizer is identified by its files alone
REFSCORES_SCHEMA_VERSION = 2  # 2: scorer settings recorded resolved
RUN_SCHEMA_VERSION = 1

EXAMPLES = "examples.parquet"
REJECTS = "rejects.parquet"
RUN_SUMMARY = "run.json"
METRICS = "metrics.jsonl"  # a run's metrics log (pipeline/storage/metrics.py)
SHARD_RE = re.compile(r"^part-(\d{5})\.parquet$")
AUDIT_LEVELS = ("quick", "full")
"""quick: integrity and statistics of a cache alone; full: with a config (staleness, re-score)."""

# Agreement to expect between two computations of the same log-probs (max per-token |diff|,
# nats), used by the step-0 check and the audit's re-score: float32 transformers runs agree to
# ~1e-6 (batch shapes and kernels differ); vLLM's kernels differ more; in bfloat16 vLLM and
# transformers were seen to differ by up to ~0.3 nats/token.
LOGPROB_TOLERANCE = {"transformers": 1e-3, "vllm": 1e-2}
LOGPROB_TOLERANCE_HALF = 0.35


class CacheError(RuntimeError):
    """An output directory is missing, incomplete or damaged; the message says what to do."""


def logprob_tolerance(dtypes: tuple[str, ...], backend: str) -> float:
    if any(d != "float32" for d in dtypes):
        return LOGPROB_TOLERANCE_HALF
    return LOGPROB_TOLERANCE[backend]


def library_versions() -> dict:
    """Versions of what computed an output (recorded in manifests, not in fingerprints)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"dpo_pipeline": __version__, "python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "tokenizers", "pyarrow", "vllm"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return versions


# --- paths ---------------------------------------------------------------------------------------


def dataset_dir(storage: str | Path, fp: str) -> Path:
    return Path(storage) / "datasets" / fp


def refscores_dir(storage: str | Path, fp: str) -> Path:
    return Path(storage) / "refscores" / fp


def run_dir(storage: str | Path, name: str) -> Path:
    return Path(storage) / "runs" / name


def audit_dir(storage: str | Path, cache_fp: str) -> Path:
    return Path(storage) / "audits" / cache_fp


def audit_report_path(storage: str | Path, cache_fp: str, level: str, suffix: str = ".json") -> Path:
    return audit_dir(storage, cache_fp) / f"{level}{suffix}"


def storage_of(output_dir: str | Path) -> Path:
    """The storage root an output directory ``<storage>/<kind>/<name>`` belongs to."""
    return Path(output_dir).resolve().parent.parent


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# --- identities (fingerprint inputs) ---------------------------------------------------------------


def data_settings(cfg: Config) -> dict:
    d = cfg.data
    return {
        "format": d.format,
        "eval_fraction": d.eval_fraction,
        "columns": [d.prompt_column, d.chosen_column, d.rejected_column],
        "implicit_prompt_marker": d.implicit_prompt_marker,
        "max_row_bytes": d.max_row_bytes,
    }


def tokenize_settings(cfg: Config) -> dict:
    t = cfg.tokenize
    return {
        "max_length": t.max_length,
        "max_prompt_length": t.max_prompt_length,
        "max_completion_length": t.max_completion_length,
        "truncation_mode": t.truncation_mode,
        "add_eos": t.add_eos,
        "min_response_tokens": t.min_response_tokens,
    }


def dataset_identity(cfg: Config, data_sha256: str | None = None) -> dict:
    """Everything that determines the bytes of the prepared dataset (and nothing else).

    The tokenizer is identified by its files (tokenizer.json, its config, the chat template...):
    they determine every token id, and hashing them needs no tokenizer to be loaded.
    """
    return {
        "kind": "dataset",
        "schema_version": DATASET_SCHEMA_VERSION,
        "data_sha256": data_sha256 or input_sha256(resolve_input(cfg.data, cfg.storage)),
        "data_settings": data_settings(cfg),
        "tokenizer_files": tokenizer_files(cfg.model),
        "tokenize_settings": tokenize_settings(cfg),
    }


def refscores_identity(cfg: Config, dataset_fp: str, backend: str) -> dict:
    """Everything that determines the reference scores. How batches are formed (the scorer's
    settings) changes low-order bits only: recorded in the manifest, not part of the identity."""
    return {
        "kind": "refscores",
        "schema_version": REFSCORES_SCHEMA_VERSION,
        "dataset_fingerprint": dataset_fp,
        "model": model_fingerprint(cfg.model),
        "dtype": cfg.model.dtype,
        "backend": backend,
        "store_token_logps": cfg.score.store_token_logps,
        "shard_rows": cfg.score.shard_rows,
    }


# train keys that change no weight: where to write, how often to report, what to check.
RUN_KEYS_NOT_IN_IDENTITY = ("run_name", "ref_cache", "logging_steps", "eval_steps", "save_steps",
                            "save_total_limit", "per_device_eval_batch_size", "step0_check", "step0_tolerance",
                            "device", "nproc_per_node", "nnodes", "distributed", "per_device_train_batch_size",
                            "gradient_accumulation_steps", "report_to", "padding_free", "micro_batch_tokens",
                            "fused_lm_head", "torch_compile", "torch_compile_mode", "pad_to_multiple_of")

# Run-identity keys left out while at their defaults (the identity of a run from before them).
LOSS_KEYS_AT_DEFAULT = ("loss_weights", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau",
                        "dpop_lambda", "simpo_gamma", "ld_alpha", "use_weighting", "max_completion_length",
                        "length_normalize")


def policy_init(cfg: Config) -> ModelConfig:
    """The weights the policy starts from: train.init_from, else the reference model itself.
    Loaded in float32 (master weights; bf16-mixed trains under autocast), or in bfloat16 for
    pure bf16 training (see precision.py).

    A run is scored against the model it starts from, and the reference cache is scored by
    model.path: so train.init_from must hold model.path's weights (same content fingerprint),
    else this refuses and says to make the starting model model.path. An adapter folder is
    refused too (`dpo score` scores full models): merge it first."""
    init = cfg.train.init_from
    if init and Path(init) != Path(cfg.model.path):
        fix = ("set model.path to it, run `dpo score -c CONFIG` (the reference is the model the run starts "
               "from), and leave train.init_from null")
        if is_adapter_dir(init):
            raise ConfigError(
                f"train.init_from {init} is a LoRA adapter, but a run is scored against the model it starts "
                "from and `dpo score` scores full models only: merge the adapter into its base (a run with "
                "train.merge_adapter: true writes final/merged/), then " + fix + " (train.peft trains a new "
                "adapter on it)"
            )
        reference = ModelConfig(path=cfg.model.path, revision=cfg.model.revision,
                                trust_remote_code=cfg.model.trust_remote_code)
        if model_fingerprint(ModelConfig(path=init)) != model_fingerprint(reference):
            raise ConfigError(
                f"train.init_from {init} holds other weights than model.path {cfg.model.path}, whose "
                f"log-probs the reference cache holds: to start from {init}, {fix}"
            )
    return ModelConfig(path=cfg.train.init_from or cfg.model.path,
                       revision=None if cfg.train.init_from else cfg.model.revision,
                       dtype=precision.param_dtype(precision.resolve(cfg)),
                       trust_remote_code=cfg.model.trust_remote_code,
                       attn_implementation=cfg.model.attn_implementation)


def effective_batch_size(train_cfg, world_size: int) -> int:
    """Pairs per optimizer step: per device x accumulation x devices, as TRL counts them."""
    return train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps * world_size


def run_identity(cfg: Config, dataset_fp: str, cache_fp: str | None, init_fp: dict) -> dict:
    """What determines a run's weights. ``cache_fp``: the reference cache's fingerprint, None for
    a reference-free run (train.needs_reference() false: no cache is read, so none is named)."""
    train = dataclasses.asdict(cfg.train)
    for key in RUN_KEYS_NOT_IN_IDENTITY:
        train.pop(key)
    # Loss keys added after runs existed: absent at their defaults, so those runs keep their
    # fingerprints; a one-loss list is that loss (TRL's [name] is name).
    names = cfg.train.loss_names()
    if len(names) == 1 and train["loss_weights"] is None:
        train["loss_type"] = names[0]
    defaults = {f.name: f.default for f in dataclasses.fields(cfg.train)}
    for key in LOSS_KEYS_AT_DEFAULT:
        if train[key] == defaults[key]:
            train.pop(key)
    # Resolved. What a step computes is the mean over effective_batch_size pairs, however they
    # are split into micro-batches and processes (DDP, FSDP2): a run resumes on another number
    # of GPUs at the same effective batch.
    train.update(precision=precision.resolve(cfg), save_dtype=precision.save_dtype(cfg),
                 effective_batch_size=effective_batch_size(cfg.train, world_size(cfg.train)))
    return {"kind": "run", "schema_version": RUN_SCHEMA_VERSION, "dataset": dataset_fp,
            "refscores": cache_fp, "init": init_fp, "dtype": cfg.model.dtype, "train": train}


# --- reading manifests, and trusting the bytes they describe --------------------------------------


def _manifest(directory: Path, kind: str, fix: str) -> dict:
    manifest = read_json(directory / MANIFEST)
    if manifest is None:
        raise CacheError(f"{directory} has no readable {MANIFEST}: {fix}")
    if manifest.get("kind") != kind or not isinstance(manifest.get("fingerprint"), str):
        raise CacheError(f"{directory / MANIFEST} is not a {kind} manifest: {fix}")
    if manifest.get("complete") is not True:
        raise CacheError(f"{directory} is incomplete (its writer did not finish): {fix}")
    return manifest


def _check_file(path: Path, sha256, fix: str) -> None:
    if not isinstance(sha256, str):
        raise CacheError(f"the manifest of {path.parent} has no sha256 for {path.name}: {fix}")
    if not path.is_file():
        raise CacheError(f"{path} is missing: {fix}")
    if sha256_verified(path) != sha256:
        raise CacheError(f"{path} is damaged (its sha256 differs from the manifest): {fix}")


def verified_dataset(directory: str | Path) -> dict:
    """The manifest of a complete prepared dataset whose files all match it, or CacheError."""
    directory = Path(directory)
    fix = f"delete {directory} and run `dpo prepare -c CONFIG` again"
    manifest = _manifest(directory, "dataset", fix)
    files = manifest.get("files")
    if not isinstance(files, dict) or EXAMPLES not in files:
        raise CacheError(f"{directory / MANIFEST} lists no {EXAMPLES}: {fix}")
    for name, entry in files.items():
        _check_file(directory / name, entry.get("sha256") if isinstance(entry, dict) else None, fix)
    return manifest


def refscores_shards(manifest: dict) -> list[dict]:
    """The shard entries of a refscores manifest, checked for shape (file, rows, sha256)."""
    shards = manifest.get("shards")
    ok = isinstance(shards, list) and all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and SHARD_RE.match(s["file"])
        and isinstance(s.get("rows"), int) and isinstance(s.get("sha256"), str)
        for s in shards
    )
    if not ok:
        raise CacheError("the refscores manifest's shard list is malformed")
    return shards


def verified_refscores(directory: str | Path) -> dict:
    """The manifest of a complete reference cache whose shards all match it, or CacheError.

    Every shard is hashed (once per process, see store.sha256_verified) before anything reads it.
    """
    directory = Path(directory)
    fix = "run `dpo score -c CONFIG` to rescore (it rescores missing shards; delete damaged ones first)"
    manifest = _manifest(directory, "refscores", fix)
    try:
        shards = refscores_shards(manifest)
    except CacheError as exc:
        raise CacheError(f"{directory / MANIFEST}: {exc}: {fix}") from None
    inputs = manifest.get("inputs")
    needed = ("dataset_fingerprint", "model", "dtype", "backend", "shard_rows")
    if not isinstance(inputs, dict) or any(key not in inputs for key in needed):
        raise CacheError(f"{directory / MANIFEST} does not record what the cache was scored from: {fix}")
    if sum(s["rows"] for s in shards) != manifest.get("rows"):
        raise CacheError(f"{directory / MANIFEST}: the shards' rows do not add up to its rows: {fix}")
    for shard in shards:
        path = directory / shard["file"]
        _check_file(path, shard["sha256"], f"delete {path} if it exists, then {fix}")
    return manifest


def proven_refscores(directory: str | Path) -> dict:
    """``verified_refscores``, and every value proven too (refvalues: page checksums, the value
    checksums written inside each shard, every row's model-free consistency), or CacheError
    naming the shard and the rows. Reads the whole cache: for deciding whether to rescore."""
    from pipeline.storage.refvalues import ValueProofError, read_shards

    directory = Path(directory)
    manifest = verified_refscores(directory)
    paths = [directory / shard["file"] for shard in manifest["shards"]]
    try:
        read_shards(paths, None)
    except ValueProofError as exc:
        raise CacheError(f"{directory}: {exc}: run `dpo score -c CONFIG`, it rescores the shards whose "
                         "values are not proven") from None
    return manifest


def is_verified(check, directory: str | Path | None) -> bool:
    """Whether ``check`` (verified_dataset / verified_refscores / proven_refscores) accepts the directory."""
    if directory is None:
        return False
    try:
        check(directory)
    except CacheError:
        return False
    return True


def verified_run(directory: str | Path) -> dict | None:
    """The summary of a finished run whose final weights match it; None if unfinished or damaged."""
    directory = Path(directory)
    summary = read_json(directory / RUN_SUMMARY)
    if not summary or summary.get("complete") is not True or not isinstance(summary.get("files"), dict):
        return None
    for name, sha in summary["files"].items():
        path = directory / name
        if not path.is_file() or sha256_verified(path) != sha:
            return None
    return summary


# --- finding each stage's output for a config ------------------------------------------------------


def plan_dataset_dir(cfg: Config) -> Path:
    """Where the prepare stage puts (or put) the dataset for ``cfg``; nothing is written."""
    return dataset_dir(cfg.storage, fingerprint(dataset_identity(cfg)))


def source_exists(cfg: Config) -> bool:
    """Whether data.path can be read: an existing path, a glob pattern matching files, or a Hub
    dataset id."""
    if is_pattern(cfg.data.path):
        return bool(glob.glob(str(cfg.data.path), recursive=True))
    return Path(cfg.data.path).exists() or is_hub_id(cfg.data.path)


def locate_dataset(cfg: Config) -> Path:
    """The verified prepared dataset for ``cfg``, or a CacheError that says what to run.

    Found by fingerprint while data.path exists. Later stages only need token ids, so when
    data.path is gone the dataset prepared from that path with the same settings and tokenizer
    files is used, if there is exactly one.
    """
    if not source_exists(cfg):
        return _dataset_without_source(cfg)
    planned = plan_dataset_dir(cfg)
    if not is_verified(verified_dataset, planned):
        if planned.exists():
            verified_dataset(planned)  # raises with the reason
        raise CacheError(
            f"no prepared dataset for this configuration ({planned} is missing): run "
            "`dpo prepare -c CONFIG` with the same config first"
        )
    return planned


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
            "settings is in storage: set data.path to your preference data and run `dpo prepare`"
        )
    names = ", ".join(m.name[:12] for m in matches)
    raise CacheError(
        f"data.path {cfg.data.path} does not exist and several datasets were prepared from it "
        f"({names}): restore the file, or prepare again"
    )


def plan_refscores_dir(cfg: Config, dataset_fp: str) -> Path:
    """Where the score stage puts (or put) the cache for ``cfg``; nothing is written."""
    from pipeline.logprobs.backends import resolve_backend

    backend = resolve_backend(cfg.score.backend)
    return refscores_dir(cfg.storage, fingerprint(refscores_identity(cfg, dataset_fp, backend)))


def locate_ref_cache(cfg: Config, dataset_fp: str) -> Path:
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
    planned = plan_refscores_dir(cfg, dataset_fp)
    if planned.is_dir():
        verified_refscores(planned)
        return planned
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
    raise CacheError(f"no reference scores of this dataset by {cfg.model.path}: run `dpo score -c CONFIG` "
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
            f"({cfg.model.path}): set model.path to the reference model it was scored with, or "
            "rescore with `dpo score -c CONFIG`"
        )


def plan_run(cfg: Config, dataset_fp: str, cache_dir: Path | None) -> tuple[str, Path]:
    """(run fingerprint, run directory) of the run for ``cfg`` and this reference cache (None: a
    reference-free run, which reads no cache): where the train stage puts (or put) it."""
    cache_fp = None
    if cache_dir is not None:
        manifest = read_json(Path(cache_dir) / MANIFEST)
        cache_fp = manifest.get("fingerprint") if manifest else Path(cache_dir).name
    return run_dir_for(cfg, dataset_fp, cache_fp, model_fingerprint(policy_init(cfg)))


def run_dir_for(cfg: Config, dataset_fp: str, cache_fp: str | None, init_fp: dict) -> tuple[str, Path]:
    """(run fingerprint, run directory): train.run_name, else named after the fingerprint."""
    run_fp = fingerprint(run_identity(cfg, dataset_fp, cache_fp, init_fp))
    return run_fp, run_dir(cfg.storage, cfg.train.run_name or f"dpo-{run_fp[:12]}")
