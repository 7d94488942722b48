"""One typed configuration for the whole pipeline: its sections, keys, defaults and checks.

Every default lives here, once; each key's docstring is its documentation (tools/gen_config_docs.py
renders docs/reference/config.md from them). Loading a YAML file and ``--set`` overrides into a
validated ``Config``: pipeline/config/load.py.

    from pipeline.config.load import load_config
    cfg = load_config("run.yaml", overrides=["tokenize.max_length=512"])
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pipeline.config.checks import FOLDER_NAME_KEYS, RUN_NAME, check_folder_name, check_range  # noqa: F401
from pipeline.config.loss_traits import LOSS_TRAITS, FDivergenceType, LossType, check_loss_options
from pipeline.config.rounds import GenerateConfig, JudgeConfig, PairsConfig, RoundsConfig
from pipeline.config.sweep import SweepConfig
from pipeline.errors import ConfigError

REQUIRED: Any = dataclasses.MISSING


@dataclass
class DataConfig:
    path: str = REQUIRED
    """Preference data: .jsonl, .jsonl.gz, .parquet, a `datasets` save_to_disk folder, a glob of one
    kind of them (data/train-*.jsonl.gz: the files sorted, read one after the other, rows numbered
    on across them; the manifest lists them), or a Hub dataset id (org/name; with name, data_dir,
    split, revision), read with datasets.load_dataset."""
    name: Optional[str] = None
    """Hub dataset: its configuration (load_dataset's name)."""
    data_dir: Optional[str] = None
    """Hub dataset: the folder of the repository to read (e.g. harmless-base)."""
    split: str = "train"
    """Hub dataset: the split to read."""
    revision: Optional[str] = None
    """Hub dataset: branch, tag or commit (null: main)."""
    format: Literal["auto", "standard", "conversational", "implicit"] = "auto"
    """The rows' preference format (TRL's): standard, conversational, implicit, or auto: detected
    from the first records."""
    eval_fraction: float = 0.05
    """Share of examples (chosen deterministically by id) that goes to the eval split."""
    prompt_column: str = "prompt"
    """Column (or JSON field) of the prompt."""
    chosen_column: str = "chosen"
    """Column (or JSON field) of the preferred response."""
    rejected_column: str = "rejected"
    """Column (or JSON field) of the other response."""
    implicit_prompt_marker: str = "\n\nAssistant:"
    """Implicit-prompt text data: the prompt ends after the last marker the two texts share."""
    max_reject_fraction: float = 0.5
    """Fail the stage when more than this share of the rows read is rejected."""
    max_row_bytes: Optional[int] = 1_048_576
    """Rows larger than this (bytes of the JSONL line, or of a Parquet/`datasets` row as JSON) are
    rejected as row_too_large before tokenizing: tokenizing takes about 270 bytes of memory per
    byte of text (a 10 MB row: 2.7 GB and 20 s), and only tokenize.max_length tokens are kept.
    1 MiB is about 250k tokens. null: no limit."""

    def validate(self) -> None:
        check_range("data.eval_fraction", self.eval_fraction, 0.0, 1.0, hi_open=True)
        check_range("data.max_reject_fraction", self.max_reject_fraction, 0.0, 1.0)
        if self.max_row_bytes is not None:
            check_range("data.max_row_bytes", self.max_row_bytes, 1, None)
        for name in ("prompt_column", "chosen_column", "rejected_column"):
            if not getattr(self, name):
                raise ConfigError(f"data.{name}: must be a non-empty column name")
        # A Hub dataset is kept under <storage>/hub/datasets/<repo>/<commit>/<name>/<data_dir>/<split>/
        # (data.hub_dataset): each of these is a folder name, checked as train.run_name is.
        check_folder_name("data.split", self.split, "test")
        if self.name is not None:
            check_folder_name("data.name", self.name, "default", ", or null for the default configuration")
        if self.data_dir is not None:
            for part in self.data_dir.split("/"):  # a folder of the repository (a/b kept as a--b)
                check_folder_name("data.data_dir", part, "harmless-base", ", or null for the whole repository",
                                   whole=self.data_dir)


@dataclass
class ModelConfig:
    path: str = REQUIRED
    """A Hugging Face causal LM (the reference model; its tokenizer is used): a local folder, or
    a Hub id (org/name), resolved through the local Hugging Face cache (HF_HOME, HF_HUB_OFFLINE,
    the usual token) and downloaded when missing and online."""
    revision: Optional[str] = None
    """With a Hub id: the branch, tag or commit to use (null: main)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the model is loaded and scored in (bfloat16 on a GPU); it sets train.precision's default."""
    trust_remote_code: bool = False
    """Run code shipped with the model folder. Off unless you trust its author."""
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "eager"] = "auto"
    """The attention kernel scoring and training use (transformers' name). auto: sdpa (a dense
    mask, pairs packed into rows as long as the longest pair), measured fastest on CPU and on an
    H200 GPU; flex_attention: a block-sparse mask over one flat row per batch (compiled per
    shape); eager: the slow fallback. See docs/scaling.md, "Padding-free batches"."""


@dataclass
class TokenizeConfig:
    max_length: int = 1024
    """Upper bound on prompt + the longer response, in tokens."""
    max_prompt_length: Optional[int] = 512
    """Prompts are cut to this many tokens (null: only max_length bounds them)."""
    max_completion_length: Optional[int] = None
    """Each response is cut (at its end) to this many tokens (null: only max_length bounds it)."""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """How prompts are cut: keep_end cuts tokens from the start (the end is next to the response)."""
    add_eos: bool = True
    """Append the tokenizer's EOS to plain-text responses (chat templates end turns themselves)."""
    min_response_tokens: int = 1
    """A row whose prompt leaves fewer response tokens than this is rejected as too long."""
    batch_rows: int = 1024
    """Rows handed to the fast tokenizer per call (speed only; the output is identical)."""

    def validate(self) -> None:
        check_range("tokenize.max_length", self.max_length, 2, None)
        check_range("tokenize.min_response_tokens", self.min_response_tokens, 1, None)
        check_range("tokenize.batch_rows", self.batch_rows, 1, None)
        if self.max_completion_length is not None:
            check_range("tokenize.max_completion_length", self.max_completion_length, self.min_response_tokens, None)
        if self.max_prompt_length is not None:
            check_range("tokenize.max_prompt_length", self.max_prompt_length, 1, None)
            if self.max_prompt_length + self.min_response_tokens > self.max_length:
                raise ConfigError(
                    f"tokenize.max_prompt_length ({self.max_prompt_length}) leaves no room for a "
                    f"response within tokenize.max_length ({self.max_length})", hint="make it at most "
                    f"{self.max_length - self.min_response_tokens}"
                )


@dataclass
class ScoreConfig:
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """auto: vllm only where it imports, a CUDA GPU is present and a measurement says it scores
    faster than transformers on that card at that model size (pipeline/logprobs/backends:
    VLLM_MEASURED_FASTER; none yet), else transformers; `dpo score` says which and why."""
    tokens_per_batch: Optional[int] = None
    """transformers backend: tokens per forward pass (batch rows x longest sequence; with
    flex_attention's one flat row, the tokens themselves); null: 2048 on CPU (measured best for
    cache locality), 32768 on CUDA."""
    prefix_sharing: bool = True
    """transformers backend: run each prompt once for both responses (prompt + chosen + rejected
    in one row, the rejected tokens masked from the chosen ones). Off: two separate sequences."""
    padding_free: bool = True
    """transformers backend, with prefix_sharing: pack pairs into rows without padding but at a
    row's end (logprobs.pack_pairs; one flat row per batch with flex_attention). Off: one
    right-padded row per pair."""
    store_token_logps: bool = True
    """Also store per-token log-probs (list<float32>) for auditing and length-normalized losses."""
    shard_rows: int = 4096
    """Examples per Parquet shard: the unit of resumption after a crash."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """transformers backend: auto picks cuda when available."""
    tensor_parallel_size: int = 1
    """vllm backend: GPUs to shard the model across."""
    gpu_memory_utilization: float = 0.85
    """vllm backend: share of GPU memory vLLM may take."""
    max_num_batched_tokens: int = 16384
    """vllm backend: tokens per engine step."""
    workers: Optional[int] = None
    """Scoring workers, each loading the model once and taking shards until none is left, each on
    its own tensor_parallel_size GPUs; null: one per visible GPU, 1 on the CPU."""
    runner: Literal["local", "ray"] = "local"
    """local: worker processes on this machine; ray: Ray actors on a Ray cluster."""
    ray_address: Optional[str] = None
    """With runner ray: the cluster to join (e.g. 10.0.0.5:6379 or "auto"); null: a local Ray
    started on 127.0.0.1 for the run."""
    reuse: bool = True
    """Copy the rows a complete cache of another dataset already holds (same model, tokenizer,
    dtype, backend; verified) instead of scoring them again."""

    def validate(self) -> None:
        if self.workers is not None:
            check_range("score.workers", self.workers, 1, None)
        if self.tokens_per_batch is not None:
            check_range("score.tokens_per_batch", self.tokens_per_batch, 1, None)
        check_range("score.shard_rows", self.shard_rows, 1, None)
        check_range("score.tensor_parallel_size", self.tensor_parallel_size, 1, None)
        check_range("score.gpu_memory_utilization", self.gpu_memory_utilization, 0.05, 1.0)
        check_range("score.max_num_batched_tokens", self.max_num_batched_tokens, 1, None)


@dataclass
class PeftConfig:
    """LoRA adapters (peft's LoraConfig; the keys carry peft's names). Only the adapters train."""

    r: int = 8
    """Rank of each adapter."""
    lora_alpha: float = 16.0
    """Scale: the adapter's update is multiplied by lora_alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: Union[list[str], str] = "all-linear"
    """Modules that get adapters: a list of (suffixes of) module names, e.g. [q_proj, v_proj], a
    regular expression, or "all-linear" (every linear layer but the output head)."""

    def validate(self) -> None:
        check_range("train.peft.r", self.r, 1, None)
        check_range("train.peft.lora_alpha", self.lora_alpha, 1e-12, None)
        check_range("train.peft.lora_dropout", self.lora_dropout, 0.0, 1.0, hi_open=True)
        if not self.target_modules or (isinstance(self.target_modules, list)
                                       and not all(self.target_modules)):
            raise ConfigError("train.peft.target_modules: name at least one module, e.g. [q_proj, v_proj], "
                              "or use all-linear")


@dataclass
class TrainConfig:
    """Names and meanings of Hugging Face `TrainingArguments` / TRL `DPOConfig`, so that a TRL
    recipe can be copied over (the names this project used before: RENAMED, "Renamed keys" in
    docs/reference/config.md)."""

    loss_type: Union[list[LossType], LossType] = "sigmoid"
    """A loss of pipeline/logprobs/losses.py (the table: docs/reference/train.md, Losses), or a list of them summed with
    loss_weights (TRL's MPO-style mixtures): TRL 1.16's sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair,
    sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, and dpop, simpo,
    orpo (simpo and orpo are reference-free)."""
    loss_weights: Optional[list[float]] = None
    """Weight of each loss of a loss_type list (same length); null: 1.0 each."""
    beta: float = 0.1
    """DPO's beta: the implicit rewards are beta x the log-ratios to the reference."""
    label_smoothing: float = 0.0
    """sigmoid: cDPO label smoothing; robust: the assumed label-flip rate (< 0.5); exo_pair: the
    label smoothing eps (> 0; the paper uses 1e-3); aot, aot_unpaired, simpo: label smoothing."""
    f_divergence_type: FDivergenceType = "reverse_kl"
    """f-DPO: the divergence to the reference that the scores come from (reverse_kl is DPO); other
    values only with sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft (as TRL)."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of f_divergence_type alpha_divergence."""
    discopop_tau: float = 0.05
    """discopop: the temperature of its log-ratio modulation (the paper's 0.05)."""
    dpop_lambda: float = 50.0
    """dpop: weight of the penalty on the chosen log-prob falling below the reference's (the paper's 50)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma (TRL's CPOConfig default)."""
    rpo_alpha: float = 0.0
    """Weight of an added NLL term on the chosen response, mean over its tokens (TRL's RPO)."""
    ld_alpha: Optional[float] = None
    """LD-DPO (Liu et al. 2024, arXiv:2409.06411): the log-probs of the longer response's tokens
    beyond the shorter one's length are weighted by ld_alpha (TRL's ld_alpha; 1 is DPO); null: off.
    Needs the reference's per-token log-probs (a cache scored with score.store_token_logps: true)."""
    use_weighting: bool = False
    """WPO (Zhou et al. 2024, arXiv:2406.11827): weight each pair's loss by the policy's
    probability of its two responses, as TRL's use_weighting."""
    length_normalize: Optional[Literal["chosen", "rejected", "both"]] = None
    """Give the losses that side's log-probs (policy and reference) as per-token means instead of
    sums: chosen, rejected or both (both with sigmoid is sigmoid_norm); refused with the losses
    that already normalize by length (ipo, sigmoid_norm, simpo, orpo). null: sums, as TRL."""
    max_completion_length: Optional[int] = None
    """Cut each response to its first this many tokens at training time (TRL's name), shorter than
    what was scored: the reference sums are recomputed from the cached per-token log-probs of
    that prefix, without rescoring (needs a cache scored with score.store_token_logps: true).
    null: the responses as prepared (tokenize.max_completion_length)."""
    learning_rate: float = 1e-6
    """Peak learning rate (must be > 0)."""
    per_device_train_batch_size: int = 8
    """Preference pairs per device per forward/backward pass. One optimizer step sees
    per_device_train_batch_size x gradient_accumulation_steps x world size pairs, as in TRL."""
    per_device_eval_batch_size: int = 8
    """Pairs per eval forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward/backward passes per optimizer step."""
    padding_free: bool = True
    """Padding-free micro-batches (TRL's name): several pairs per row, each pair's positions
    restarting at 0 and its attention confined to its own prompt and response, padding only at the
    end of a row (logprobs.pack_pairs; the layout follows model.attn_implementation). Same
    log-probs as padded batches within float rounding, so not part of the run's identity; off: one
    right-padded row per pair."""
    micro_batch_tokens: Union[int, Literal["auto"], None] = "auto"
    """Split each step's pairs on a device into micro-batches of at most this many tokens (prompt +
    chosen + rejected; a longer pair alone), longest first, instead of per_device_train_batch_size
    pairs each: one long pair no longer sets the memory of the step. Same gradient (a mean over the
    step's pairs). auto: a budget from the model, the tokens whose activations kept for the backward
    weigh about as much as its weights, at least 256 MiB of them (docs/scaling.md; SmolLM2-135M: 512,
    5056 with gradient_checkpointing), applied only to the steps where a fixed micro-batch would
    exceed it. null: gradient_accumulation_steps micro-batches of per_device_train_batch_size."""
    fused_lm_head: bool = True
    """Log-probs through the fused LM head (pipeline/logprobs/head.py): no [tokens x vocab] tensor kept
    for the backward. Same values and gradients within float rounding; false: plain autograd."""
    torch_compile: Optional[bool] = None
    """torch.compile the decoder layers (HF's name); recompiles are counted in metrics.jsonl
    (compile/recompiles). null: off until measured to pay off on the device (not on the CPU:
    docs/scaling.md; CUDA not yet measured: bench/gpu_suite.py)."""
    torch_compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune",
                                         "max-autotune-no-cudagraphs"]] = None
    """torch.compile's mode (HF's name); null: default."""
    pad_to_multiple_of: Optional[int] = None
    """Pad each micro-batch's rows to a multiple of this many tokens (TRL's name): a few shapes for
    a compiled model. null: 64 with torch_compile, else no padding beyond the longest row."""
    max_steps: Optional[int] = None
    """Optimizer steps; null: num_train_epochs over the train split."""
    num_train_epochs: float = 1.0
    """Epochs over the train split, used when max_steps is null."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 (as Hugging Face: lr x step / warmup_steps); overrides warmup_ratio."""
    warmup_ratio: float = 0.0
    """Warmup as a share of the total steps (rounded up), used when warmup_steps is 0."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """After warmup: linear or cosine decay to 0 at the last step; constant ignores warmup."""
    weight_decay: float = 0.0
    """AdamW's weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping; the norm is still reported)."""
    logging_steps: int = 1
    """Write train metrics every this many steps, averaged over them."""
    eval_steps: int = 50
    """Eval-split metrics every this many steps (0: only at the start and the end)."""
    save_steps: int = 100
    """Checkpoint every this many steps (0: none besides final/)."""
    save_total_limit: int = 2
    """Checkpoints kept (the oldest are deleted)."""
    seed: int = 0
    """Seed of the data order and the initialization."""
    run_name: Optional[str] = None
    """Folder under <storage>/runs/; null: named after a fingerprint of the run's inputs.
    1-100 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit."""
    init_from: Optional[str] = None
    """Policy weights to start from; null: model.path (the reference model itself). They must be
    model.path's weights (docs/reference/train.md, Starting point)."""
    ref_cache: Optional[str] = None
    """A refscores directory to use; null: the cache `dpo score` made for this config."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for more compute."""
    precision: Optional[Literal["float32", "bf16-mixed", "bf16"]] = None
    """float32; bf16-mixed (float32 master weights and AdamW states, bf16 autocast); bf16 (pure:
    weights, gradients and AdamW states in bfloat16, stochastically rounded updates). null:
    from model.dtype (float32 -> float32, bfloat16 -> bf16-mixed)."""
    save_dtype: Optional[Literal["float32", "bfloat16"]] = None
    """dtype of the weights in final/; null: the dtype trained (float32 unless precision is bf16)."""
    step0_check: Literal["error", "warn", "off"] = "error"
    """Policy starting from the reference: compare step-0 log-probs with the cache."""
    step0_tolerance: Optional[float] = None
    """Max per-token |diff| (nats) of that check; null: by dtype and backend (docs/reference/train.md,
    Step-0 check)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the policy trains: auto picks cuda when available."""
    peft: Optional[PeftConfig] = None
    """LoRA adapters on the policy (see PeftConfig); null: full fine-tuning."""
    merge_adapter: bool = False
    """With train.peft: also write final/merged/, the model with the adapters merged in."""
    nproc_per_node: int = 1
    """Training processes on this machine, one per GPU (torchrun's --nproc-per-node); > 1:
    `dpo train` starts torchrun. World size = nproc_per_node x nnodes: it sets the effective
    batch, so it is part of the run's identity."""
    nnodes: int = 1
    """Machines of a multi-node run (each starts torchrun itself, see docs/scaling.md)."""
    report_to: Union[list[str], str] = "none"
    """Experiment trackers, as TRL's report_to: none, tensorboard, mlflow, wandb, trackio, or a
    list; each needs its library (pip install -e '.[tensorboard]' ...)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With world size > 1: DDP (a full replica per process) or FSDP2 (weights, gradients and
    optimizer states sharded over the processes: fully_shard per decoder layer, then the root)."""

    def validate(self) -> None:
        if self.peft is not None:
            self.peft.validate()
        elif self.merge_adapter:
            raise ConfigError("train.merge_adapter: true needs train.peft (LoRA); there is no adapter to merge")
        check_range("train.beta", self.beta, 1e-12, None)
        self.report_to = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        unknown = [r for r in self.report_to if r not in REPORT_TO]
        if unknown or ("none" in self.report_to and len(self.report_to) > 1):
            raise ConfigError(f"train.report_to: {self.report_to!r}: use none, or any of "
                              f"{', '.join(REPORT_TO[1:])} (a name or a list)")
        if self.learning_rate <= 0:
            raise ConfigError(
                f"train.learning_rate: {self.learning_rate!r} trains nothing (the weights would not "
                "change)", hint="set a positive learning rate, e.g. train.learning_rate=1e-6"
            )
        check_range("train.label_smoothing", self.label_smoothing, 0.0, 0.5, hi_open=True)
        check_loss_options(self)
        check_range("train.rpo_alpha", self.rpo_alpha, 0.0, None)
        for key in ("max_completion_length", "micro_batch_tokens", "pad_to_multiple_of"):
            if getattr(self, key) not in (None, "auto"):
                check_range(f"train.{key}", getattr(self, key), 1, None)
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_total_limit", "nproc_per_node", "nnodes"):
            check_range(f"train.{key}", getattr(self, key), 1, None)
        if self.max_steps is not None:
            check_range("train.max_steps", self.max_steps, 1, None)
        check_range("train.num_train_epochs", self.num_train_epochs, 1e-9, None)
        check_range("train.warmup_steps", self.warmup_steps, 0, None)
        check_range("train.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range("train.weight_decay", self.weight_decay, 0.0, None)
        check_range("train.max_grad_norm", self.max_grad_norm, 0.0, None)
        check_range("train.eval_steps", self.eval_steps, 0, None)
        check_range("train.save_steps", self.save_steps, 0, None)
        if self.step0_tolerance is not None:
            check_range("train.step0_tolerance", self.step0_tolerance, 0.0, None)
        if self.run_name is not None:
            check_folder_name("train.run_name", self.run_name, "beta0.1-run2",
                               ", or null for a name from the fingerprint")

    def loss_names(self) -> list[str]:
        """loss_type as a list (TRL's DPOConfig makes a name a one-element list)."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    def needs_reference(self) -> bool:
        """Whether the losses read the reference's log-probs: False when every loss of loss_type
        is reference-free (simpo, orpo), and then no reference cache is needed, scored or read."""
        return not all(LOSS_TRAITS[name].reference_free for name in self.loss_names())

    def needs_token_reference(self) -> bool:
        """Whether training needs the reference's per-token log-probs (a cache scored with
        score.store_token_logps: true): max_completion_length (the reference sums of the kept
        prefix) or ld_alpha (LD-DPO's split at the shared length)."""
        return self.needs_reference() and (self.max_completion_length is not None or self.ld_alpha is not None)


# Keys renamed to their Hugging Face / TRL names; the old name is an error that names the new one.
RENAMED = {
    "train.lr": "train.learning_rate",
    "train.batch_size": "train.per_device_train_batch_size (pairs per device per pass; one optimizer "
                        "step sees it x train.gradient_accumulation_steps x world size)",
    "train.grad_accum": "train.gradient_accumulation_steps",
    "train.epochs": "train.num_train_epochs",
    "train.schedule": "train.lr_scheduler_type",
    "train.eval_every": "train.eval_steps",
    "train.save_every": "train.save_steps",
    "train.keep_checkpoints": "train.save_total_limit",
    "train.loss": "train.loss_type",
    "train.sft_weight": "train.rpo_alpha",
    "tokenize.prompt_truncation": "tokenize.truncation_mode",
}


def world_size(train_cfg: TrainConfig) -> int:
    """Processes of a training run: train.nproc_per_node x train.nnodes."""
    return train_cfg.nproc_per_node * train_cfg.nnodes


@dataclass
class AuditConfig:
    rescore_rows: int = 4
    """Rows re-scored with the transformers backend when the flow audits a new cache (0: none)."""
    tolerance: Optional[float] = None
    """Max per-token |diff| (nats) of the re-score check; null: by dtype and backend (docs/audit.md)."""
    seed: int = 0
    """Seed of the re-score sample."""

    def validate(self) -> None:
        check_range("audit.rescore_rows", self.rescore_rows, 0, None)
        if self.tolerance is not None:
            check_range("audit.tolerance", self.tolerance, 0.0, None)


@dataclass
class Config:
    data: DataConfig
    model: ModelConfig
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    storage: str = "storage"
    """Artifact root: datasets/, refscores/, runs/ live below it."""
    sweep: Optional[SweepConfig] = None
    """A hyper-parameter sweep over this config (`dpo sweep`); other commands run the config as it is."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Sampling completions (`dpo generate`, `dpo rounds`)."""
    judge: Optional[JudgeConfig] = None
    """The reward of a completion (`dpo judge`, `dpo rounds`); null: none set."""
    pairs: PairsConfig = field(default_factory=PairsConfig)
    """Pairs from judged completions (`dpo judge`, `dpo rounds`)."""
    rounds: Optional[RoundsConfig] = None
    """Iterative DPO (`dpo rounds`); other commands ignore it."""

    def validate(self) -> None:
        if not self.storage:
            raise ConfigError("storage: must be a directory path")
        for section in (self.data, self.tokenize, self.score, self.train, self.audit, self.sweep, self.generate,
                        self.judge, self.pairs, self.rounds):
            if section is not None:
                section.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


REPORT_TO = ("none", "tensorboard", "mlflow", "wandb", "trackio")

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_id(value: str, base: Path | None = None) -> bool:
    """``org/name`` that is not an existing path (relative to ``base``, else the current folder)."""
    return bool(HUB_ID.fullmatch(str(value))) and not ((base or Path.cwd()) / str(value)).exists()
