"""The train stage: DPO with only the policy in memory, reading cached reference log-probs.

    result = train(load_config("run.yaml"))          # or: dpo train -c run.yaml [--resume]
    result.run_dir  # <storage>/runs/<run name>/ with config.yaml, metrics.jsonl, checkpoints/,
                    # final/ (save_pretrained, safetensors + tokenizer), run.json

``train`` is setup, then a loop over ``train_step`` (the benchmark calls the same step):
  1. find the prepared dataset and its reference cache (both verified against their manifests),
     and check the contract between them (dataset fingerprint, every id scored, token counts
     equal): refuse on any mismatch;
  2. take the run's lock (a second `dpo train` of the same run name refuses, naming the holder);
  3. load exactly one model, the policy (model.path, or train.init_from), with LoRA adapters
     when train.peft is set (pipeline/adapters.py);
  4. step-0 check: a policy that starts from the reference weights must reproduce the cached
     log-probs on the first batch (rewards 0, loss ln 2);
  5. each ``train_step``: gradient_accumulation_steps micro-batches, each ONE forward pass over prompt + chosen +
     rejected (the prompt computed once; several pairs per row without padding, see logprobs.pack_pairs),
     loss scaled so the sum of
     micro-batch gradients is the gradient of the mean over the whole batch; a non-finite loss
     or gradient norm stops the run; clip, AdamW step, schedule; metrics to metrics.jsonl (metrics.py);
     eval and checkpoints on their cadence;
  6. final eval, final/ and run.json (with the sha256 of every file in final/).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import yaml

from . import adapters, distributed, layout, metrics, precision
from .checkpoint import (Checkpoint, checkpoint_dir, list_checkpoints, load_latest_checkpoint, prune_checkpoints,
                         save_checkpoint)
from .config import Config, world_size
from .distributed import World
from .logprobs import PairTokens, pair_token_logps, supports_shared_prefix
from .losses import LOSSES, PairLogps, combined_loss, rewards
from .models import load_causal_lm, load_tokenizer, model_fingerprint
from .progress import Progress
from .refvalues import ValueProofError, read_shards
from .run_report import write_run_report
from .store import (atomic_write_json, atomic_write_text, ensure_dir, exclusive, lock_path, remove_leftovers,
                    sha256_file)
from .trackers import TrackerError, Trackers, open_trackers

log = logging.getLogger("dpo.train")


class TrainError(RuntimeError):
    """The stage refuses to train (contract broken, bad run folder); says what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    skipped: bool


class TokenLists:
    """The token-id lists of one column, as one int32 array and offsets: ~4.5 bytes per token
    instead of ~41 as Python lists (measured: 9.6M tokens, 43 MB vs 394 MB), which every rank
    of a distributed run holds. ``lists[i]`` is the i-th list (a Python list of ints)."""

    dtype = np.int32

    def __init__(self, column):
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
        self.values = column.flatten().to_numpy(zero_copy_only=False).astype(self.dtype)
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.values[self.offsets[i] : self.offsets[i + 1]].tolist()

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def truncated(self, n: int):
        """A copy with each list cut to its first ``n`` items."""
        lengths = self.lengths()
        position = np.arange(self.offsets[-1], dtype=np.int64) - np.repeat(self.offsets[:-1], lengths)
        out = object.__new__(type(self))
        out.values = self.values[position < n]
        out.offsets = np.concatenate([[0], np.cumsum(np.minimum(lengths, n), dtype=np.int64)])
        return out


class ValueLists(TokenLists):
    """Per-token values of one column (the reference's per-token log-probs, list<float32> in the
    cache), stored as TokenLists stores ids: one float32 array and offsets (~4 bytes per token).
    ``lists[i]`` is the i-th list, a float32 numpy array (a view: do not write to it)."""

    dtype = np.float32

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def sums(self) -> np.ndarray:
        """The sum of each list, in float64 ([N]; 0 for an empty list)."""
        values = np.append(self.values.astype(np.float64), 0.0)  # reduceat needs starts < len
        sums = np.add.reduceat(values, self.offsets[:-1]) if len(self) else np.zeros(0)
        return np.where(self.lengths() > 0, sums, 0.0)


@dataclass
class Split:
    """Token ids and cached reference log-probs of one split, aligned by row.

    ref_chosen / ref_rejected are None for a reference-free run (train.needs_reference() false:
    no cache is read; cached_reference then gives NaN, so a loss that read them would stop the run
    as non-finite instead of training on made-up values). ref_chosen_token_logps /
    ref_rejected_token_logps: the reference's per-token log-probs (float32, aligned with chosens /
    rejecteds), loaded only when train.needs_token_reference() (else None)."""

    ids: list[str]
    prompts: TokenLists | list[list[int]]
    chosens: TokenLists | list[list[int]]
    rejecteds: TokenLists | list[list[int]]
    ref_chosen: torch.Tensor | None  # [N] float64 -> used as float32 in the loss
    ref_rejected: torch.Tensor | None
    ref_chosen_token_logps: ValueLists | None = None
    ref_rejected_token_logps: ValueLists | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def truncated(self, n: int) -> "Split":
        """train.max_completion_length: every response cut to its first ``n`` tokens, and the
        reference sums of the cut ones recomputed from the cached per-token log-probs of the kept
        prefix (float64 sums; the responses already within ``n`` keep their cached sums)."""
        if self.ref_chosen is None:  # reference-free: only what the policy sees
            return Split(self.ids, self.prompts, self.chosens.truncated(n), self.rejecteds.truncated(n), None, None)
        if self.ref_chosen_token_logps is None or self.ref_rejected_token_logps is None:
            raise TrainError("train.max_completion_length needs the reference's per-token log-probs; "
                             "load the split with token_reference=True")
        sides = {}
        for side, ids, sums, per_token in (
                ("chosen", self.chosens, self.ref_chosen, self.ref_chosen_token_logps),
                ("rejected", self.rejecteds, self.ref_rejected, self.ref_rejected_token_logps)):
            cut = per_token.truncated(n)
            longer = torch.from_numpy(per_token.lengths() > n)
            sides[side] = (ids.truncated(n), torch.where(longer, torch.from_numpy(cut.sums()), sums), cut)
        (chosens, ref_chosen, chosen_tokens), (rejecteds, ref_rejected, rejected_tokens) = sides["chosen"], sides["rejected"]
        return Split(self.ids, self.prompts, chosens, rejecteds, ref_chosen, ref_rejected, chosen_tokens,
                     rejected_tokens)


# --- 1. inputs and their contract ----------------------------------------------------------------


def load_split_data(dataset_dir: Path, cache_dir: Path | None,
                    token_reference: bool = False) -> tuple[dict[str, Split], dict | None]:
    """Examples joined with their cached reference log-probs, after checking the contract.

    cache_dir None: a reference-free run; the examples alone (Split.ref_* None), and no cache
    manifest (None). token_reference: also the reference's per-token log-probs (Split.ref_*_token_logps),
    which the cache has only when scored with score.store_token_logps: true (else TrainError).
    """
    # Both verified: every file is present and hashes as its manifest says, before a byte is read.
    dataset = layout.verified_dataset(dataset_dir)
    if cache_dir is None:
        return _examples_only(dataset_dir), None
    cache = layout.verified_refscores(cache_dir)
    fix = "rescore with `dpo score -c CONFIG` (or point train.ref_cache at the cache of this dataset)"
    if cache["inputs"]["dataset_fingerprint"] != dataset["fingerprint"]:
        raise TrainError(
            f"the reference cache {cache_dir.name[:12]} was scored on dataset "
            f"{cache['inputs']['dataset_fingerprint'][:12]}, but this config's dataset is "
            f"{dataset['fingerprint'][:12]}: {fix}"
        )
    examples = pq.read_table(
        dataset_dir / layout.EXAMPLES,
        columns=["id", "split", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_tokens", "rejected_tokens"],
    )
    columns = ["id", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens"]
    paths = [cache_dir / shard["file"] for shard in cache["shards"]]
    if token_reference:
        per_token = ["chosen_token_logps", "rejected_token_logps"]
        if not set(per_token) <= set(cache.get("columns") or pq.read_schema(paths[0]).names):
            raise TrainError(
                f"train.max_completion_length and train.ld_alpha need the reference's per-token log-probs, "
                f"but the reference cache {cache_dir} was scored without them (score.store_token_logps: "
                "false): set score.store_token_logps: true and run `dpo score -c CONFIG` again (a new "
                "cache, used from then on; no other stage reruns), or drop train.max_completion_length / "
                "train.ld_alpha"
            )
        columns += per_token
    try:  # every value proven as it is read (refvalues): no unverified number reaches the loss
        scores = read_shards(paths, columns)
    except ValueProofError as exc:
        raise TrainError(f"the reference cache {cache_dir} holds values that are not proven: {exc}. "
                         "Run `dpo score -c CONFIG`: it rescores those shards") from None
    ex_ids, sc_ids = examples.column("id"), scores.column("id")
    if pc.count_distinct(sc_ids).as_py() != len(sc_ids):
        raise TrainError(f"the reference cache {cache_dir} lists some ids twice: {fix}")
    position = pc.index_in(ex_ids, value_set=sc_ids)  # row of each example's score, or null
    missing = pc.is_null(position)
    if pc.any(missing).as_py():
        absent = ex_ids.filter(missing).to_pylist()
        raise TrainError(
            f"{len(absent)} examples have no reference score (e.g. ids {', '.join(absent[:3])}): "
            f"the cache does not cover this dataset; {fix}"
        )
    if len(sc_ids) != len(ex_ids):
        raise TrainError(f"the cache has {len(sc_ids)} scores for {len(ex_ids)} examples: {fix}")
    scores = scores.take(position)
    for side in ("chosen", "rejected"):
        differs = pc.not_equal(examples.column(f"{side}_tokens"), scores.column(f"{side}_tokens"))
        if pc.any(differs).as_py():
            bad = ex_ids.filter(differs).to_pylist()
            raise TrainError(
                f"{len(bad)} examples have a different {side} token count in the cache than in the "
                f"dataset (e.g. id {bad[0]}): the cache was computed from other token ids; {fix}"
            )
        if token_reference:
            counted = pc.list_value_length(scores.column(f"{side}_token_logps")).fill_null(-1)
            differs = pc.not_equal(pc.cast(counted, pa.int64()), pc.cast(scores.column(f"{side}_tokens"), pa.int64()))
            if pc.any(differs).as_py():
                bad = ex_ids.filter(differs).to_pylist()
                raise TrainError(
                    f"{len(bad)} examples of the reference cache {cache_dir} have not one per-token "
                    f"{side} log-prob per token (e.g. id {bad[0]}): {fix}"
                )
    splits = {}
    for name in ("train", "eval"):
        keep = pc.equal(examples.column("split"), name)
        ex, sc = examples.filter(keep), scores.filter(keep)
        splits[name] = Split(
            ex.column("id").to_pylist(),
            TokenLists(ex.column("prompt_ids")),
            TokenLists(ex.column("chosen_ids")),
            TokenLists(ex.column("rejected_ids")),
            torch.tensor(sc.column("chosen_logp").to_numpy(), dtype=torch.float64),
            torch.tensor(sc.column("rejected_logp").to_numpy(), dtype=torch.float64),
            ValueLists(sc.column("chosen_token_logps")) if token_reference else None,
            ValueLists(sc.column("rejected_token_logps")) if token_reference else None,
        )
    return splits, cache


def _examples_only(dataset_dir: Path) -> dict[str, Split]:
    """The splits of a prepared dataset without reference values (a reference-free run)."""
    examples = pq.read_table(dataset_dir / layout.EXAMPLES,
                             columns=["id", "split", "prompt_ids", "chosen_ids", "rejected_ids"])
    splits = {}
    for name in ("train", "eval"):
        ex = examples.filter(pc.equal(examples.column("split"), name))
        splits[name] = Split(ex.column("id").to_pylist(), TokenLists(ex.column("prompt_ids")),
                             TokenLists(ex.column("chosen_ids")), TokenLists(ex.column("rejected_ids")), None, None)
    return splits


# --- helpers -------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of train.learning_rate at optimizer step ``step`` (0-based), as Hugging Face's
    schedulers (transformers.get_scheduler): warmup step / warmup from 0, then linear or cosine
    decay to 0 at ``total``; "constant" has no warmup."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(train_cfg, total_steps: int) -> int:
    """train.warmup_steps, else train.warmup_ratio of the total, rounded up (as Hugging Face)."""
    return train_cfg.warmup_steps or math.ceil(train_cfg.warmup_ratio * total_steps)


def effective_batch_size(train_cfg, world_size: int = 1) -> int:
    """Pairs per optimizer step: per device x accumulation x devices, as TRL counts them."""
    return train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps * world_size


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Pairs of optimizer step ``step``: a seeded permutation per epoch, consumed in order."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        out.append(int(_permutation(seed, epoch, n)[offset]))
    return out


_PERMUTATIONS: dict = {}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMUTATIONS[key]


def cached_reference(split: Split, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of the pairs ``index`` from the cache: [B] float64 each. A split without
    reference (a reference-free run) gives NaN: the reference-free losses and their rewards never
    read it, and anything that did would stop the run as non-finite."""
    if split.ref_chosen is None or split.ref_rejected is None:
        missing = torch.full((len(index),), float("nan"), dtype=torch.float64)
        return missing, missing.clone()
    return split.ref_chosen[index], split.ref_rejected[index]


def compute_loss(cfg: Config, split: Split, index: list[int], policy_chosen, policy_rejected, scale: float,
                 reference: Callable = cached_reference, pair_weights: torch.Tensor | None = None):
    """Loss of a micro-batch (scaled by ``scale``) and the per-pair sums of its metrics.

    policy_chosen, policy_rejected: [B] float32 sequence log-probs under the policy. The loss is
    sum_k train.loss_weights[k] x train.loss_type[k] (TRL's mixture), each loss getting the summed
    log-probs and the response token counts (length-normalized losses divide by them themselves).
    pair_weights: [B] (no gradient) multiplying each pair's loss: WPO's (``wpo_weights``).
    """
    train_cfg = cfg.train
    device = policy_chosen.device
    ref_chosen, ref_rejected = (v.to(device, torch.float32) for v in reference(split, index))
    names = train_cfg.loss_names()
    chosen_len = torch.tensor([len(split.chosens[i]) for i in index], device=device, dtype=torch.float32)
    rejected_len = torch.tensor([len(split.rejecteds[i]) for i in index], device=device, dtype=torch.float32)
    sums_chosen, sums_rejected = policy_chosen, policy_rejected
    side = train_cfg.length_normalize  # each side's log-probs as per-token means (both policy and reference)
    if side in ("chosen", "both"):
        policy_chosen, ref_chosen = policy_chosen / chosen_len.clamp(min=1), ref_chosen / chosen_len.clamp(min=1)
    if side in ("rejected", "both"):
        policy_rejected = policy_rejected / rejected_len.clamp(min=1)
        ref_rejected = ref_rejected / rejected_len.clamp(min=1)
    logps = PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    per_pair = combined_loss(names, train_cfg.loss_weights, logps, train_cfg.beta, train_cfg.label_smoothing,
                             chosen_tokens=chosen_len, rejected_tokens=rejected_len,
                             f_divergence_type=train_cfg.f_divergence_type,
                             f_alpha_divergence_coef=train_cfg.f_alpha_divergence_coef,
                             discopop_tau=train_cfg.discopop_tau, dpop_lambda=train_cfg.dpop_lambda,
                             simpo_gamma=train_cfg.simpo_gamma)
    if pair_weights is not None:  # TRL weights each loss of the mixture, before the RPO term
        per_pair = per_pair * pair_weights.to(per_pair.dtype)
    if train_cfg.rpo_alpha:
        per_pair = per_pair + train_cfg.rpo_alpha * (-sums_chosen / chosen_len)
    if all(LOSSES[name].reference_free for name in names):
        # TRL's CPO / ORPO trainers: beta x the (length-normalized) policy log-prob.
        reward_chosen = train_cfg.beta * policy_chosen / chosen_len.clamp(min=1.0)
        reward_rejected = train_cfg.beta * policy_rejected / rejected_len.clamp(min=1.0)
    else:  # TRL's DPOTrainer: beta x the summed log-ratio, whatever the loss
        reward_chosen = rewards(policy_chosen, ref_chosen, train_cfg.beta)
        reward_rejected = rewards(policy_rejected, ref_rejected, train_cfg.beta)
    sums = {
        "loss": per_pair.detach().sum().item(),
        "rewards/chosen": reward_chosen.detach().sum().item(),
        "rewards/rejected": reward_rejected.detach().sum().item(),
        "rewards/accuracies": (reward_chosen > reward_rejected).float().sum().item(),
        "rewards/margins": (reward_chosen - reward_rejected).detach().sum().item(),
        "logps/chosen": sums_chosen.detach().sum().item(),
        "logps/rejected": sums_rejected.detach().sum().item(),
    }
    return per_pair.sum() * scale, sums


def ld_weights(lengths: list[int], alpha: float) -> torch.Tensor:
    """LD-DPO's per-token weights of pairs laid out chosen_0, rejected_0, chosen_1, ... (``lengths``
    of each response): 1 for the first min(chosen, rejected) tokens of each response (the shared
    length), ``alpha`` beyond it, as TRL's ld_alpha."""
    weights = []
    for chosen, rejected in zip(lengths[0::2], lengths[1::2]):
        shared = min(chosen, rejected)
        for n in (chosen, rejected):
            weights.append(torch.cat([torch.ones(shared), torch.full((n - shared,), float(alpha))]))
    return torch.cat(weights) if weights else torch.zeros(0)


def ld_reference(split: Split, index: list[int], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's reference sums [B] float64 of the pairs ``index``: the cached per-token
    log-probs weighted as ``ld_weights`` weighs the policy's."""
    if split.ref_chosen_token_logps is None or split.ref_rejected_token_logps is None:
        raise TrainError("train.ld_alpha needs the reference's per-token log-probs: the split was loaded "
                         "without them (load_split_data(..., token_reference=True))")
    chosen, rejected = [], []
    for i in index:
        c = torch.from_numpy(np.asarray(split.ref_chosen_token_logps[i], dtype=np.float64))
        r = torch.from_numpy(np.asarray(split.ref_rejected_token_logps[i], dtype=np.float64))
        w = ld_weights([len(c), len(r)], alpha).double()
        chosen.append((c * w[: len(c)]).sum())
        rejected.append((r * w[len(c) :]).sum())
    return torch.stack(chosen), torch.stack(rejected)


def wpo_weights(tokens: PairTokens) -> torch.Tensor:
    """WPO's pair weights [B] (Zhou et al. 2024, eq. 2, as TRL's use_weighting): for each
    response w = exp(mean over its tokens of log p(y_t) - log sum_v p(v)^2), the policy's
    probability of the response against its own sampling distribution, length-normalized; the
    pair's weight is w_chosen x w_rejected, without gradient."""
    with torch.no_grad():
        aligned = PairTokens(tokens.values.detach() - tokens.log_sum_sq, tokens.lengths)
        chosen, rejected = aligned.sums()
        lengths = torch.tensor(tokens.lengths, dtype=torch.float32, device=chosen.device).clamp(min=1)
        return torch.exp(chosen / lengths[0::2]) * torch.exp(rejected / lengths[1::2])


def _tokens(split: Split, index: list[int]) -> int:
    return sum(2 * len(split.prompts[i]) + len(split.chosens[i]) + len(split.rejecteds[i]) for i in index)


@dataclass
class Trainer:
    """The state of one run: policy, optimizer, schedule, data, where to write, which rank."""

    cfg: Config
    policy: torch.nn.Module
    """The causal LM (a peft model with LoRA); under FSDP2 its parameters are shards."""
    engine: torch.nn.Module
    """What runs the forward: logprobs.ResponseLogps(policy), under DDP or FSDP2 when distributed."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    splits: dict[str, Split]
    device: str
    total_steps: int
    reference: Callable = cached_reference
    """reference(split, index) -> (ref_chosen, ref_rejected); the benchmark swaps in a live model."""
    autocast: Callable = contextlib.nullcontext
    world: World = field(default_factory=World)
    trackers: Trackers = field(default_factory=lambda: Trackers([]))
    """train.report_to's trackers (rank 0 only); they see every record metrics.jsonl gets."""
    shared: bool = field(init=False)
    micro: int = field(init=False)

    def __post_init__(self):
        self.shared = supports_shared_prefix(self.policy)
        self.micro = self.cfg.train.per_device_train_batch_size
        self.batch = effective_batch_size(self.cfg.train, self.world.size)

    def token_logps(self, split: Split, index: list[int], log_sum_sq: bool = False) -> PairTokens:
        """The policy's per-token log-probs of the pairs ``index``, in one forward pass
        (padding-free rows unless train.padding_free is off)."""
        picked = [split.prompts[i] for i in index], [split.chosens[i] for i in index], [split.rejecteds[i] for i in index]
        packing = None if self.cfg.train.padding_free else "none"
        with self.autocast():
            return pair_token_logps(self.engine, *picked, shared=self.shared, device=self.device, packing=packing,
                                    log_sum_sq=log_sum_sq)

    def pair_logps(self, split: Split, index: list[int]):
        """(chosen [B], rejected [B]) sequence log-probs under the policy."""
        return self.token_logps(split, index).sums()

    def loss_inputs(self, split: Split, index: list[int]):
        """(chosen [B], rejected [B], pair weights [B] or None) for compute_loss: the sums
        LD-DPO-weighted when train.ld_alpha is set, WPO's weights when train.use_weighting."""
        train_cfg = self.cfg.train
        tokens = self.token_logps(split, index, log_sum_sq=train_cfg.use_weighting)
        weights = None if train_cfg.ld_alpha is None else ld_weights(tokens.lengths, train_cfg.ld_alpha)
        chosen, rejected = tokens.sums(weights)
        return chosen, rejected, (wpo_weights(tokens) if train_cfg.use_weighting else None)

    def micro_batch(self, index: list[int], accumulation_step: int) -> list[int]:
        """This rank's pairs of one micro-batch of the global batch ``index``: micro-batch a of
        rank r is the (a x world + r)-th run of per_device_train_batch_size pairs."""
        start = (accumulation_step * self.world.size + self.world.rank) * self.micro
        return index[start : start + self.micro]

    def evaluate(self, step: int) -> dict:
        """Eval-split metrics, each rank scoring every world-size-th pair (all ranks make the same
        number of forward passes, as FSDP2 needs; a rank with no pair left repeats pair 0 and
        discards it)."""
        split = self.splits["eval"]
        if not len(split):
            return {}
        self.engine.eval()
        totals: dict = {}
        share = list(range(self.world.rank, len(split), self.world.size))
        longest = math.ceil(len(split) / self.world.size)
        size = self.cfg.train.per_device_eval_batch_size
        with torch.no_grad():
            for start in range(0, longest, size):
                index = share[start : start + size]
                chosen, rejected, weights = self.loss_inputs(split, index or [0])
                if not index:
                    continue
                _, sums = compute_loss(self.cfg, split, index, chosen.float(), rejected.float(), 1.0,
                                       self.reference, weights)
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + value
        self.engine.train()
        totals = self.world.sum(totals)
        return {"step": step, **{f"eval/{k}": v / len(split) for k, v in totals.items()}}

    def log(self, path: Path, record: dict) -> None:
        """Append a metrics record (rank 0 writes; the others computed the same record)."""
        if self.world.main:
            metrics.append(path, record)
            self.trackers.log(record, record["step"])
            if "eval/loss" in record and record["step"] > 0:  # report.html: watchable during the run
                write_run_report(path.parent, metrics.read(path), self.cfg.to_dict())


def build_trainer(cfg: Config, splits: dict[str, Split], policy, world: World = World()) -> Trainer:
    """The engine (DDP / FSDP2 when distributed), then the optimizer (AdamW) and schedule, for
    train.precision (precision.py)."""
    train_cfg = cfg.train
    steps_per_epoch = len(splits["train"]) / effective_batch_size(train_cfg, world.size)
    total_steps = train_cfg.max_steps or math.ceil(train_cfg.num_train_epochs * steps_per_epoch)
    warmup = warmup_steps(train_cfg, total_steps)
    device = next(policy.parameters()).device.type
    mode = precision.resolve(cfg)
    engine = distributed.wrap(policy, world, train_cfg.distributed, mode)
    trained = [p for p in engine.parameters() if p.requires_grad]  # all, or LoRA's adapters (shards under FSDP2)
    optimizer = precision.make_optimizer(mode, trained, train_cfg.learning_rate, train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, train_cfg.lr_scheduler_type)
    )
    autocast = precision.autocast(mode, device) if distributed.uses_autocast(world, train_cfg.distributed) \
        else contextlib.nullcontext
    reference = cached_reference if train_cfg.ld_alpha is None or not train_cfg.needs_reference() else \
        functools.partial(ld_reference, alpha=train_cfg.ld_alpha)
    return Trainer(cfg, policy, engine, optimizer, scheduler, splits, device, total_steps, reference=reference,
                   autocast=autocast, world=world)


def train_step(trainer: Trainer, step: int) -> dict:
    """One optimizer step (0-based ``step``) on its batch; returns the step's metrics record.

    A non-finite loss or gradient norm raises TrainError before the weights change.
    """
    cfg, train_cfg, split = trainer.cfg, trainer.cfg.train, trainer.splits["train"]
    started = time.perf_counter()
    index = batch_indices(step, trainer.batch, len(split), train_cfg.seed)  # the global batch
    totals: dict = {}
    accumulation = train_cfg.gradient_accumulation_steps
    # Sum of per-pair losses x world size / effective batch: the micro-batch gradients add up, and
    # DDP / FSDP2 average them over the ranks, to the gradient of the mean loss over the batch.
    scale = trainer.world.size / trainer.batch
    for micro in range(accumulation):
        micro_index = trainer.micro_batch(index, micro)
        with distributed.accumulating(trainer.engine, sync=micro == accumulation - 1):
            chosen, rejected, weights = trainer.loss_inputs(split, micro_index)
            loss, sums = compute_loss(cfg, split, micro_index, chosen.float(), rejected.float(), scale,
                                      trainer.reference, weights)
            loss.backward()
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + value
    totals = trainer.world.sum(totals)
    clip = train_cfg.max_grad_norm if train_cfg.max_grad_norm > 0 else float("inf")
    grad_norm = distributed.clip_grad_norm(trainer.engine.parameters(), clip)
    if not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm)):
        trainer.optimizer.zero_grad(set_to_none=True)
        ids = ", ".join(split.ids[i] for i in index[:8])
        raise TrainError(
            f"non-finite {'loss' if not math.isfinite(totals['loss']) else 'gradient norm'} at step "
            f"{step + 1} (batch ids {ids}{'...' if len(index) > 8 else ''}); the weights were not "
            "updated. Lower train.learning_rate or train.beta, check those examples, then --resume from the "
            "last checkpoint"
        )
    lr = trainer.scheduler.get_last_lr()[0]
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    precision.release_memory(trainer.device)  # RSS flat across steps on CPU
    seconds = time.perf_counter() - started
    return {"step": step + 1, "epoch": (step + 1) * trainer.batch / len(split),
            **{k: v / trainer.batch for k, v in totals.items()}, "grad_norm": grad_norm, "learning_rate": lr,
            "tokens/s": _tokens(split, index) / seconds, "seconds": seconds}


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
    """Train ``cfg`` as train.nproc_per_node processes under torchrun (``distributed.launch``
    running ``python <argv>`` in each) and return the finished run. A rank that crashes after
    the run is complete and verified (run.json and the sha256 of every file in final/: seen
    once, a gloo rank aborting at exit) is reported, not fatal; any other failure raises."""
    try:
        distributed.launch(argv, cfg.train.nproc_per_node, log_dir, **options)
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
    return _finished(run_dir, run_fp, quiet=True)


def train(cfg: Config, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train one run (see the module docstring). Under torchrun every rank calls this: rank 0
    writes, all compute; with train.nproc_per_node > 1 outside torchrun, use ``dpo train``,
    which starts torchrun (distributed.launch)."""
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
    done = _finished(run.run_dir, run.fingerprint)
    if done is not None:
        return done
    # One writer per run folder: a second `dpo train` with the same run name refuses at once.
    with _run_lock(cfg, run, world):
        done = _finished(run.run_dir, run.fingerprint)
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


def _finished(run_dir: Path, run_fp: str, quiet: bool = False) -> TrainResult | None:
    previous = layout.verified_run(run_dir)
    if previous is None:
        return None
    if previous.get("fingerprint") != run_fp:
        raise TrainError(f"{run_dir} holds a finished run of another configuration: set another train.run_name")
    if not quiet:
        log.info("train: up to date, %s", run_dir)
    return TrainResult(run_dir, previous, skipped=True)


def _start(trainer: Trainer, run: _Run, resume: bool) -> int:
    """Resume from the newest loadable checkpoint, or start: step-0 check and first eval."""
    metrics_path = metrics.path_of(run.run_dir)
    if resume:
        loaded = load_latest_checkpoint(run.run_dir, lambda checkpoint: _restore(trainer, checkpoint))
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


def _save(trainer: Trainer, run: _Run, step: int) -> None:
    """A checkpoint of ``step``: the full state gathered from every rank, written by rank 0."""
    weights, optim = distributed.full_state(trainer.engine, trainer.optimizer, trainer.world)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state(trainer.device)
    ranks = trainer.world.gather(rng)  # each rank's generators, to resume exactly (dropout)
    if not trainer.world.main:
        return
    trained = set(distributed.get_trained_names(distributed.inner(trainer.engine)))
    partial = len(trained) < len(list(trainer.policy.parameters()))
    if partial:
        weights = {name: tensor for name, tensor in weights.items() if name in trained}
    state = {"step": step, "run_fingerprint": run.fingerprint, "total_steps": trainer.total_steps,
             "world_size": trainer.world.size}
    def loadable(folder: Path) -> None:  # full fine-tuning: from_pretrained(checkpoint) works
        if not partial:
            trainer.policy.config.save_pretrained(folder)
            if getattr(trainer.policy, "generation_config", None) is not None:
                trainer.policy.generation_config.save_pretrained(folder)
            load_tokenizer(trainer.cfg.model).save_pretrained(folder)

    save_checkpoint(checkpoint_dir(run.run_dir, step), Checkpoint(
        weights, optim, trainer.scheduler.state_dict(), {**rng, "ranks": ranks}, state, partial), loadable)
    prune_checkpoints(run.run_dir, trainer.cfg.train.save_total_limit)


def _restore(trainer: Trainer, checkpoint: Checkpoint) -> None:
    distributed.load_full_state(trainer.engine, trainer.optimizer, trainer.world, checkpoint.weights,
                                checkpoint.optimizer)
    trainer.scheduler.load_state_dict(checkpoint.scheduler)
    ranks = checkpoint.rng.get("ranks") or [checkpoint.rng]
    rng = ranks[trainer.world.rank] if len(ranks) == trainer.world.size else checkpoint.rng
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"], trainer.device)


def _loop(trainer: Trainer, run: _Run, start_step: int, show_progress: bool) -> dict:
    train_cfg, total = trainer.cfg.train, trainer.total_steps
    metrics_path = metrics.path_of(run.run_dir)
    bar = Progress(total, "train", "steps", show_progress, log if trainer.world.main else logging.getLogger("dpo.quiet"),
                   initial=start_step,
                   mininterval=10 if trainer.world.size > 1 else 0.1)  # torchrun's tee prints each refresh
    last_eval: dict = {}
    window: list[dict] = []  # step records since the last logged one (train.logging_steps)
    with bar:
        for step in range(start_step, total):
            record = train_step(trainer, step)
            window.append(record)
            bar.update(1)
            bar.set_postfix_str(f"loss {record['loss']:.4f} acc {record['rewards/accuracies']:.2f} "
                                f"lr {record['learning_rate']:.2e} {record['tokens/s']:,.0f} tok/s", refresh=False)
            done = step + 1
            saving = train_cfg.save_steps and done % train_cfg.save_steps == 0 and done < total
            if done % train_cfg.logging_steps == 0 or done == total or saving:
                trainer.log(metrics_path, _averaged(window))
                window = []
            if train_cfg.eval_steps and done % train_cfg.eval_steps == 0 and done < total:
                last_eval = trainer.evaluate(done)
                if last_eval:
                    trainer.log(metrics_path, last_eval)
                    log.info("eval step %d: loss %.4f, reward accuracy %.3f", done,
                             last_eval["eval/loss"], last_eval["eval/rewards/accuracies"])
            if saving:
                _save(trainer, run, done)
    return last_eval


def _finish(trainer: Trainer, run: _Run, last_eval: dict) -> TrainResult:
    """Final eval, final/ (weights + tokenizer) and run.json, which lists final/'s sha256s."""
    metrics_path = metrics.path_of(run.run_dir)
    last_eval = trainer.evaluate(trainer.total_steps)
    if last_eval:
        trainer.log(metrics_path, last_eval)
    policy = _whole_policy(trainer)  # a collective under FSDP2
    if trainer.world.main:
        summary = _write_final(trainer, run, policy, last_eval)
    return TrainResult(run.run_dir, trainer.world.broadcast(summary if trainer.world.main else None), skipped=False)


def _whole_policy(trainer: Trainer):
    """The trained policy with whole weights, on rank 0: the policy itself, or under FSDP2 a CPU
    copy loaded with the gathered weights (None on the other ranks)."""
    if trainer.world.size == 1 or trainer.cfg.train.distributed == "ddp":  # whole on every rank
        return trainer.policy
    weights, _ = distributed.full_state(trainer.engine, trainer.optimizer, trainer.world)
    if not trainer.world.main:
        return None
    cfg = trainer.cfg
    policy = load_causal_lm(layout.policy_init(cfg), "cpu")
    if cfg.train.peft is not None:
        policy = adapters.with_lora(policy, cfg.train.peft)
    policy.load_state_dict(weights)
    return policy


def _write_final(trainer: Trainer, run: _Run, policy, last_eval: dict) -> dict:
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
        "versions": layout.library_versions(),
        "complete": True,
    }
    atomic_write_json(run.run_dir / layout.RUN_SUMMARY, summary)
    return summary


def model_card(cfg: Config, run: _Run, records: list[dict], first_eval: dict | None, last_eval: dict) -> str:
    """final/README.md: a Hugging Face model card (metadata header + what was trained, on what,
    how, with what result)."""
    hub_data = (layout.verified_dataset(run.dataset_dir).get("source") or {}).get("hub") or {}
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


def _averaged(records: list[dict]) -> dict:
    """One metrics record for several steps: means, with the last step's step, epoch and learning_rate (as
    Hugging Face logs every logging_steps)."""
    last = records[-1]
    out = {key: sum(r[key] for r in records) / len(records) for key in last}
    out.update(step=last["step"], epoch=last["epoch"], learning_rate=last["learning_rate"])
    return out


