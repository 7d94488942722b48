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
from pipeline.config.schema import Config, ModelConfig, is_hub_id, world_size
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


# --- generate (iterative DPO rounds): the prompts read once, then completions sampled ------------

PROMPTS_SCHEMA_VERSION = 1
GENERATIONS_SCHEMA_VERSION = 1
PROMPTS = "prompts.parquet"  # in <storage>/prompts/<fp>/, beside REJECTS


def prompts_source(cfg: Config):
    """generate.prompts (else data.path) as a data section: a Hub id is read with data.name,
    data_dir, split and revision, a local source without them."""
    path = cfg.generate.prompts or cfg.data.path
    if is_hub_id(path):
        return dataclasses.replace(cfg.data, path=path)
    return dataclasses.replace(cfg.data, path=path, name=None, data_dir=None, revision=None)


def prompts_identity(cfg: Config, source_sha256: str | None = None) -> dict:
    """What determines the prompts table: the source's content, the column, the tokenizer (its
    files: model.path's, the project's tokenizer) and the prompt length limit
    (tokenize.max_prompt_length, else tokenize.max_length - 1: room for one token)."""
    t = cfg.tokenize
    limit = t.max_prompt_length if t.max_prompt_length is not None else t.max_length - 1
    return {
        "kind": "prompts",
        "schema_version": PROMPTS_SCHEMA_VERSION,
        "source_sha256": source_sha256 or input_sha256(resolve_input(prompts_source(cfg), cfg.storage)),
        "prompt_column": cfg.generate.prompt_column,
        "tokenizer_files": tokenizer_files(cfg.model),
        **({"text_prompts": "user_turn"} if cfg.generate.text_prompts == "user_turn" else {}),
        "max_prompt_tokens": limit,
    }


def generation_model(cfg: Config) -> ModelConfig:
    """The model generate samples from: generate.model, else model.path (with model.revision), in
    generate.dtype, else model.dtype."""
    return ModelConfig(path=cfg.generate.model or cfg.model.path,
                       revision=None if cfg.generate.model else cfg.model.revision,
                       dtype=cfg.generate.dtype or cfg.model.dtype,
                       trust_remote_code=cfg.model.trust_remote_code,
                       attn_implementation=cfg.model.attn_implementation)


def generations_identity(cfg: Config, prompts_fp: str, backend: str) -> dict:
    """What determines the sampled completions: the prompts and their slice, the model's content,
    dtype, backend and the sampling settings. Batch size and device change speed only."""
    g = cfg.generate
    model = generation_model(cfg)
    return {
        "kind": "generations",
        "schema_version": GENERATIONS_SCHEMA_VERSION,
        "prompts": prompts_fp,
        "first_prompt": g.first_prompt,
        "num_prompts": g.num_prompts,
        "model": model_fingerprint(model),
        "dtype": model.dtype,
        "backend": backend,
        "num_samples": g.num_samples,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "max_new_tokens": g.max_new_tokens,
        "seed": g.seed,
        "shard_prompts": g.shard_prompts,
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
    else this refuses and says to make the starting model model.path. With train.step0_check
    off, other weights are taken: a policy that has moved from the reference on purpose (a round
    of iterative DPO starts from the previous round's final/ against the fixed initial reference). An adapter folder is
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
        moved = cfg.train.step0_check == "off"  # a policy that moved from the reference on purpose (rounds)
        if not moved and model_fingerprint(ModelConfig(path=init)) != model_fingerprint(reference):
            raise ConfigError(
                f"train.init_from {init} holds other weights than model.path {cfg.model.path}, whose "
                f"log-probs the reference cache holds: to start from {init}, {fix} (or, for a policy that moved "
                "from this reference on purpose, as in iterative DPO, set train.step0_check=off)"
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


# --- judgements (dpo judge) --------------------------------------------------------------------------

JUDGEMENTS_SCHEMA_VERSION = 1
REWARDS = "rewards.parquet"  # a judgements folder's files: a reward per completion,
PAIRS = "pairs.jsonl"  # the preference pairs (`dpo prepare` reads them),
DROPPED = "dropped.parquet"  # and the prompts that gave none, with the reason


def importable_cwd() -> None:
    """Put the current folder first on the Python path, as ``python -m`` does, so that
    judge.function's module is found there (the `dpo` command starts with its own folder)."""
    import os

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def function_source_sha256(spec: str) -> str | None:
    """sha256 of the file of judge.function's module (None for a module without a file). Only
    that file: helpers it imports from other files are not hashed, so a change there reuses the
    old judgements (delete the folder, or touch the module)."""
    import importlib.util

    from pipeline.errors import JudgeError
    from pipeline.store import sha256_file

    module = spec.split(":")[0]
    origin = getattr(sys.modules.get(module), "__file__", None)
    if origin is None:
        importable_cwd()
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise JudgeError(f"judge.function {spec}: no module named {module}",
                             hint="put it in the current folder or on PYTHONPATH")
        origin = found.origin
    return sha256_file(origin, use_cache=False) if origin and Path(origin).is_file() else None


def judge_identity(cfg: Config) -> dict:
    """What determines the rewards: judge.function by name and its module file's sha256; a
    reward model by its content (config, safetensors weights), its tokenizer files (the chat
    template renders each completion), dtype and max_length. Batch size and device change
    low-order bits only: recorded in the manifest, not part of the identity."""
    from pipeline.config.schema import is_hub_id
    from pipeline.errors import JudgeError

    judge = cfg.judge
    if judge is None:
        raise JudgeError("no judge configured", hint="set judge.function (module:function) or judge.reward_model")
    if judge.function is not None:
        return {"kind": "function", "function": judge.function,
                "source_sha256": function_source_sha256(judge.function)}
    if not Path(judge.reward_model).is_dir() and not is_hub_id(judge.reward_model):
        raise JudgeError(f"judge.reward_model {judge.reward_model} is neither a folder nor a Hub id (org/name)",
                         hint="point it at a sequence-classification model folder (safetensors) or Hub id")
    model = ModelConfig(path=judge.reward_model, revision=judge.revision)
    return {"kind": "reward_model", "model": model_fingerprint(model), "tokenizer_files": tokenizer_files(model),
            "dtype": judge.dtype, "max_length": judge.max_length}


def judgements_identity(cfg: Config, generations_fp: str, make_pairs: bool) -> dict:
    """Everything that determines a judgements folder: the generations judged, the judge, and
    the pair rules when pairs are made (the seed only for best_random, the one rule drawing)."""
    pairs = None
    if make_pairs:
        pairs = {"strategy": cfg.pairs.strategy, "min_margin": cfg.pairs.min_margin}
        if cfg.pairs.strategy == "best_random":
            pairs["seed"] = cfg.pairs.seed
    return {"kind": "judgements", "schema_version": JUDGEMENTS_SCHEMA_VERSION, "generations": generations_fp,
            "judge": judge_identity(cfg), "pairs": pairs}
