"""The config sections of iterative DPO: generate:, judge:, pairs: and rounds: (pipeline/config/schema.py
holds them in ``Config``; each key's docstring is its documentation).

    cfg.generate.num_samples, cfg.judge.function, cfg.pairs.strategy, cfg.rounds.iterations
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from pipeline.config.checks import check_folder_name, check_range
from pipeline.errors import ConfigError


@dataclass
class GenerateConfig:
    """Sampling completions from a policy (`dpo generate`; each round of `dpo rounds`)."""

    model: Optional[str] = None
    """The model to sample from: a folder (a run's final/) or a Hub id; null: model.path. `dpo
    rounds` sets it per round (round r samples from round r-1's final/)."""
    prompts: Optional[str] = None
    """Where the prompts come from: a .jsonl / .parquet file, a `datasets` folder or a Hub dataset
    id (read like data.path, its split data.split); null: data.path's prompts. A prompt is a
    string (plain text) or a list of chat messages (the chat template is applied with the
    generation prompt). Repeated prompts are kept once."""
    prompt_column: str = "prompt"
    """Column (or JSON field) of the prompt in the prompts source."""
    text_prompts: Literal["as_text", "user_turn"] = "as_text"
    """A prompt that is a string: as_text, tokenized as plain text; user_turn, made one user message
    [{role: user, content: ...}] and rendered with the chat template (an instruct model's prompts
    from a text column). The pairs keep the form used."""
    first_prompt: int = 0
    """The slice of prompts to sample: from this position (after repeated prompts are removed)."""
    num_prompts: Optional[int] = None
    """How many prompts from first_prompt (null: all the rest). `dpo rounds` sets the slice."""
    num_samples: int = 4
    """Completions per prompt (K)."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy, every sample the same)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 256
    """Tokens per completion at most (finish reason length when reached)."""
    seed: int = 0
    """Seed of the sampling: each (prompt, sample) draws from its own generator seeded from this
    seed, the prompt's id and the sample index, so the same hardware gives the same tokens
    whatever the batch."""
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """auto: vllm when it imports and a CUDA GPU is present (prefix caching on), else transformers
    (batched, KV cache, left padding)."""
    batch_size: int = 32
    """transformers backend: sequences (prompt x sample) per generation batch."""
    shard_prompts: int = 256
    """Prompts per Parquet shard: the unit of resumption after a crash."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """transformers backend: auto picks cuda when available."""
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """dtype the model samples in; null: model.dtype."""
    workers: Optional[int] = None
    """Generation workers, each loading the model once and taking shards until none is left, each
    on its own score.tensor_parallel_size GPUs with vLLM (one GPU with transformers); null: one per
    visible GPU, 1 on the CPU."""
    runner: Literal["local", "ray"] = "local"
    """local: worker processes on this machine; ray: Ray actors on a Ray cluster."""
    ray_address: Optional[str] = None
    """With runner ray: the cluster to join (e.g. 10.0.0.5:6379 or "auto"); null: a local Ray
    started on 127.0.0.1 for the run."""

    def validate(self) -> None:
        if self.workers is not None:
            check_range("generate.workers", self.workers, 1, None)
        if not self.prompt_column:
            raise ConfigError("generate.prompt_column: must be a non-empty column name")
        check_range("generate.first_prompt", self.first_prompt, 0, None)
        if self.num_prompts is not None:
            check_range("generate.num_prompts", self.num_prompts, 1, None)
        check_range("generate.num_samples", self.num_samples, 1, None)
        check_range("generate.temperature", self.temperature, 0.0, None)
        check_range("generate.top_p", self.top_p, 1e-9, 1.0)
        check_range("generate.max_new_tokens", self.max_new_tokens, 1, None)
        check_range("generate.batch_size", self.batch_size, 1, None)
        check_range("generate.shard_prompts", self.shard_prompts, 1, None)


@dataclass
class JudgeConfig:
    """A reward per completion (`dpo judge`): a reward model or a Python function."""

    function: Optional[str] = None
    """A Python function `module:function(prompt, completion) -> float` (rules, verifiers, unit
    tests): prompt is the prompt as read (text, or a list of chat messages), completion the
    sampled text. The module is imported from the current folder or the Python path."""
    reward_model: Optional[str] = None
    """A sequence-classification reward model (AutoModelForSequenceClassification with one label):
    a folder or a Hub id. Each (prompt, completion) is rendered with its tokenizer's chat template
    (a plain-text prompt as one user turn)."""
    revision: Optional[str] = None
    """With a Hub id reward_model: the branch, tag or commit (null: main)."""
    batch_size: int = 16
    """reward_model: completions per forward pass."""
    max_length: int = 2048
    """reward_model: prompt + completion tokens at most (longer ones keep their start; counted)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """reward_model: auto picks cuda when available."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """reward_model: dtype of the forward pass."""

    def validate(self) -> None:
        if (self.function is None) == (self.reward_model is None):
            raise ConfigError("judge: set exactly one of judge.function (module:function) and "
                              "judge.reward_model (a folder or Hub id)",
                              hint="e.g. --set judge.function=mypkg.rules:reward")
        if self.function is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.function):
            raise ConfigError(f"judge.function: {self.function!r} is not module:function",
                              hint="e.g. mypkg.rules:reward")
        check_range("judge.batch_size", self.batch_size, 1, None)
        check_range("judge.max_length", self.max_length, 2, None)


@dataclass
class PairsConfig:
    """Preference pairs from judged completions (`dpo judge`)."""

    strategy: Literal["best_worst", "best_random"] = "best_worst"
    """best_worst: the highest-rewarded completion of a prompt against its lowest; best_random:
    against another one drawn at random (seeded by pairs.seed and the prompt)."""
    min_margin: float = 0.0
    """Drop a pair whose reward margin is below this (ties, margin 0, are always dropped)."""
    seed: int = 0
    """Seed of best_random's draw."""

    def validate(self) -> None:
        check_range("pairs.min_margin", self.min_margin, 0.0, None)


@dataclass
class RoundsConfig:
    """Iterative DPO (`dpo rounds`): each round samples from the current policy, judges, pairs,
    and trains on the new pairs from it."""

    iterations: int = 2
    """Rounds to run."""
    prompts_per_round: int = 64
    """Prompts sampled per round: round r takes the r-th slice of the prompts that are not held out."""
    reference: Literal["initial", "previous"] = "initial"
    """The reference of every round: initial, the starting model (model.path; each round scores
    only its new pairs), or previous: the policy the round starts from."""
    eval_prompts: int = 32
    """Prompts held out for the win rate (the same ones each round): the first this many by
    prompt id, never sampled for training."""
    eval_max_new_tokens: Optional[int] = None
    """Tokens per completion in the win-rate evaluation; null: generate.max_new_tokens."""
    eval_temperature: float = 0.0
    """Sampling temperature of the win-rate evaluation (0: greedy)."""
    name: Optional[str] = None
    """Folder under <storage>/rounds/ (and the runs' name prefix); null: the config file's name."""

    def validate(self) -> None:
        check_range("rounds.iterations", self.iterations, 1, None)
        check_range("rounds.prompts_per_round", self.prompts_per_round, 1, None)
        check_range("rounds.eval_prompts", self.eval_prompts, 1, None)
        if self.eval_max_new_tokens is not None:
            check_range("rounds.eval_max_new_tokens", self.eval_max_new_tokens, 1, None)
        check_range("rounds.eval_temperature", self.eval_temperature, 0.0, None)
        if self.name is not None:
            check_folder_name("rounds.name", self.name, "smollm2-iterative", ", or null for the config file's name")
