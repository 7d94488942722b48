"""Where each stage's output lives, and what identifies it: the folder's name is the fingerprint
(sha256) of the output's identity, everything that determines its bytes.

    <storage>/datasets/<fp>/     examples.parquet, rejects.parquet, manifest.json   (prepare)
    <storage>/refscores/<fp>/    part-NNNNN.parquet, manifest.json                  (score)
    <storage>/audits/<cache fp>/ full.json|html, quick.json|html                    (audit)
    <storage>/runs/<run name>/   config.yaml, metrics.jsonl, checkpoints/, final/, run.json (train)
    <storage>/prompts/<fp>/      prompts.parquet, rejects.parquet, manifest.json     (generate)
    <storage>/generations/<fp>/  part-NNNNN.parquet, manifest.json                  (generate)
    <storage>/judgements/<fp>/   rewards.parquet, pairs.jsonl, dropped.parquet, manifest.json (judge)
    <storage>/rounds/<name>/     rounds.json, report.html                          (dpo rounds)
    <storage>/locks/             one lock file per output directory being written

    inputs = paths.refscores_identity(cfg, dataset_fp, "transformers")   # one function per stage
    out_dir = paths.refscores_dir(cfg.storage, fingerprint(inputs))      # one per kind of output

A stage writes the identity into its manifest (with ``library_versions``, which are recorded, not
fingerprinted); the staleness checks and the audit compare against the same functions. A run is
named train.run_name, else after its fingerprint (locate.run_dir_for). The shards' file names are
storage/shards.py's.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.config.schema import Config, ModelConfig, world_size
from pipeline.data import input_sha256, resolve_input
from pipeline.errors import ConfigError
from pipeline.models import precision
from pipeline.models.adapters import is_adapter_dir
from pipeline.models.loading import model_fingerprint, tokenizer_files

# Schema versions: part of each identity, so a format change never reuses an old directory.
DATASET_SCHEMA_VERSION = 3  # 2: the tokenizer is identified by its files alone; 3: identical_after_truncation
REFSCORES_SCHEMA_VERSION = 2  # 2: scorer settings recorded resolved
RUN_SCHEMA_VERSION = 1

EXAMPLES = "examples.parquet"
REJECTS = "rejects.parquet"
RUN_SUMMARY = "run.json"
METRICS = "metrics.jsonl"  # a run's metrics log (pipeline/storage/metrics.py)
AUDIT_LEVELS = ("quick", "full")
"""quick: integrity and statistics of a cache alone; full: with a config (staleness, re-score)."""


# --- folders ---------------------------------------------------------------------------------------


def dataset_dir(storage: str | Path, fp: str) -> Path:
    return Path(storage) / "datasets" / fp


def refscores_dir(storage: str | Path, fp: str) -> Path:
    return Path(storage) / "refscores" / fp


def run_dir(storage: str | Path, name: str) -> Path:
    return Path(storage) / "runs" / name


def prompts_dir(storage: str | Path, fp: str) -> Path:
    return Path(storage) / "prompts" / fp


def generations_dir(storage: str | Path, fp: str) -> Path:
    return Path(storage) / "generations" / fp


def judgements_dir(storage: str | Path, fp: str) -> Path:
    return Path(storage) / "judgements" / fp


def rounds_dir(storage: str | Path, name: str) -> Path:
    return Path(storage) / "rounds" / name


def audit_dir(storage: str | Path, cache_fp: str) -> Path:
    return Path(storage) / "audits" / cache_fp


def audit_report_path(storage: str | Path, cache_fp: str, level: str, suffix: str = ".json") -> Path:
    return audit_dir(storage, cache_fp) / f"{level}{suffix}"


def storage_of(output_dir: str | Path) -> Path:
    """The storage root an output directory ``<storage>/<kind>/<name>`` belongs to."""
    return Path(output_dir).resolve().parent.parent


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
