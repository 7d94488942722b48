"""The train stage's data: the prepared examples joined with their cached reference log-probs
(checked against the cache's contract), and which pairs each optimizer step takes (the learning
rate at each step: schedule.py).

    splits, cache = load_split_data(dataset_dir, cache_dir, token_reference=False)
    index = batch_indices(step, batch_size, len(splits["train"]), seed)   # the step's pairs
    groups = token_micro_batches(tokens, budget)                          # train.micro_batch_tokens
    budget = auto_token_budget(policy, checkpointing)                     # ... auto: from the model
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.errors import TrainError, ValueProofError
from pipeline.storage.paths import EXAMPLES
from pipeline.storage.refvalues import read_shards
from pipeline.storage.trust import verified_dataset, verified_refscores


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


# --- inputs and their contract -------------------------------------------------------------------

_FIX = "rescore with `dpo score -c CONFIG` (or point train.ref_cache at the cache of this dataset)"


def load_split_data(dataset_dir: Path, cache_dir: Path | None,
                    token_reference: bool = False) -> tuple[dict[str, Split], dict | None]:
    """Examples joined with their cached reference log-probs, after checking the contract.

    cache_dir None: a reference-free run; the examples alone (Split.ref_* None), and no cache
    manifest (None). token_reference: also the reference's per-token log-probs (Split.ref_*_token_logps),
    which the cache has only when scored with score.store_token_logps: true (else TrainError).
    """
    # Both verified: every file is present and hashes as its manifest says, before a byte is read.
    dataset = verified_dataset(dataset_dir)
    if cache_dir is None:
        return _examples_only(dataset_dir), None
    cache = verified_refscores(cache_dir)
    if cache["inputs"]["dataset_fingerprint"] != dataset["fingerprint"]:
        raise TrainError(
            f"the reference cache {cache_dir.name[:12]} was scored on dataset "
            f"{cache['inputs']['dataset_fingerprint'][:12]}, but this config's dataset is "
            f"{dataset['fingerprint'][:12]}: {_FIX}"
        )
    examples = pq.read_table(
        dataset_dir / EXAMPLES,
        columns=["id", "split", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_tokens", "rejected_tokens"],
    )
    scores = _aligned_scores(examples, _read_scores(cache_dir, cache, token_reference), cache_dir)
    for side in ("chosen", "rejected"):
        _check_token_counts(examples, scores, side, cache_dir, token_reference)
    splits = {}
    for name in ("train", "eval"):
        keep = pc.equal(examples.column("split"), name)
        splits[name] = _split_of(examples.filter(keep), scores.filter(keep), token_reference)
    return splits, cache


def _read_scores(cache_dir: Path, cache: dict, token_reference: bool) -> pa.Table:
    """The cache's rows (with the per-token log-probs when ``token_reference``), every value proven."""
    columns = ["id", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens"]
    paths = [cache_dir / shard["file"] for shard in cache["shards"]]
    if token_reference:
        per_token = ["chosen_token_logps", "rejected_token_logps"]
        if not set(per_token) <= set(cache.get("columns") or pq.read_schema(paths[0]).names):
            raise TrainError(
                f"train.max_completion_length and train.ld_alpha need the reference's per-token log-probs, "
                f"but the reference cache {cache_dir} was scored without them (score.store_token_logps: "
                "false)", hint="set score.store_token_logps: true and run `dpo score -c CONFIG` again (a new "
                "cache, used from then on; no other stage reruns), or drop train.max_completion_length / "
                "train.ld_alpha"
            )
        columns += per_token
    try:  # every value proven as it is read (refvalues): no unverified number reaches the loss
        return read_shards(paths, columns)
    except ValueProofError as exc:
        raise TrainError(f"the reference cache {cache_dir} holds values that are not proven: {exc}. "
                         "Run `dpo score -c CONFIG`: it rescores those shards") from None


def _aligned_scores(examples: pa.Table, scores: pa.Table, cache_dir: Path) -> pa.Table:
    """The cache's rows in the examples' order: each id once, every example scored, no other."""
    ex_ids, sc_ids = examples.column("id"), scores.column("id")
    if pc.count_distinct(sc_ids).as_py() != len(sc_ids):
        raise TrainError(f"the reference cache {cache_dir} lists some ids twice: {_FIX}")
    position = pc.index_in(ex_ids, value_set=sc_ids)  # row of each example's score, or null
    missing = pc.is_null(position)
    if pc.any(missing).as_py():
        absent = ex_ids.filter(missing).to_pylist()
        raise TrainError(
            f"{len(absent)} examples have no reference score (e.g. ids {', '.join(absent[:3])}): "
            f"the cache does not cover this dataset; {_FIX}"
        )
    if len(sc_ids) != len(ex_ids):
        raise TrainError(f"the cache has {len(sc_ids)} scores for {len(ex_ids)} examples: {_FIX}")
    return scores.take(position)


def _check_token_counts(examples: pa.Table, scores: pa.Table, side: str, cache_dir: Path,
                        token_reference: bool) -> None:
    """The cache counts ``side``'s tokens as the dataset does (and has one per-token log-prob each)."""
    ex_ids = examples.column("id")
    differs = pc.not_equal(examples.column(f"{side}_tokens"), scores.column(f"{side}_tokens"))
    if pc.any(differs).as_py():
        bad = ex_ids.filter(differs).to_pylist()
        raise TrainError(
            f"{len(bad)} examples have a different {side} token count in the cache than in the "
            f"dataset (e.g. id {bad[0]}): the cache was computed from other token ids; {_FIX}"
        )
    if token_reference:
        counted = pc.list_value_length(scores.column(f"{side}_token_logps")).fill_null(-1)
        differs = pc.not_equal(pc.cast(counted, pa.int64()), pc.cast(scores.column(f"{side}_tokens"), pa.int64()))
        if pc.any(differs).as_py():
            bad = ex_ids.filter(differs).to_pylist()
            raise TrainError(
                f"{len(bad)} examples of the reference cache {cache_dir} have not one per-token "
                f"{side} log-prob per token (e.g. id {bad[0]}): {_FIX}"
            )


def _split_of(ex: pa.Table, sc: pa.Table, token_reference: bool) -> Split:
    return Split(
        ex.column("id").to_pylist(),
        TokenLists(ex.column("prompt_ids")),
        TokenLists(ex.column("chosen_ids")),
        TokenLists(ex.column("rejected_ids")),
        torch.tensor(sc.column("chosen_logp").to_numpy(), dtype=torch.float64),
        torch.tensor(sc.column("rejected_logp").to_numpy(), dtype=torch.float64),
        ValueLists(sc.column("chosen_token_logps")) if token_reference else None,
        ValueLists(sc.column("rejected_token_logps")) if token_reference else None,
    )


def _examples_only(dataset_dir: Path) -> dict[str, Split]:
    """The splits of a prepared dataset without reference values (a reference-free run)."""
    examples = pq.read_table(dataset_dir / EXAMPLES,
                             columns=["id", "split", "prompt_ids", "chosen_ids", "rejected_ids"])
    splits = {}
    for name in ("train", "eval"):
        ex = examples.filter(pc.equal(examples.column("split"), name))
        splits[name] = Split(ex.column("id").to_pylist(), TokenLists(ex.column("prompt_ids")),
                             TokenLists(ex.column("chosen_ids")), TokenLists(ex.column("rejected_ids")), None, None)
    return splits


# --- batching ------------------------------------------------------------------------------------


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


MIN_ACTIVATION_BYTES = 256 * 2**20
"""auto never budgets activations below this: under it memory is not worth saving, and a small
model's passes would be overhead (the demo's model: 31,360 tokens, so its steps keep their pairs)."""


def auto_token_budget(model, checkpointing: bool) -> int | None:
    """train.micro_batch_tokens auto: the tokens whose activations kept for the backward weigh about
    as much as the model's weights, so that a step's peak memory is about the training state plus
    one more copy of the weights, however long its pairs; at least MIN_ACTIVATION_BYTES of them. A
    decoder layer keeps about 6 x hidden + 4 x intermediate values per token (its input, two norms,
    q/k/v, the attention's output, the MLP's gate, up, activation and product); with gradient
    checkpointing, its input alone (hidden) plus one layer's recomputation. Rounded up to a multiple
    of 64. None (fixed micro-batches) when the model's config does not give num_hidden_layers,
    hidden_size and intermediate_size. The trainer regroups a step by it only where a fixed
    micro-batch would exceed it (Trainer.micro_batches)."""
    config = getattr(model, "config", None)
    sizes = [getattr(config, key, None) for key in ("num_hidden_layers", "hidden_size", "intermediate_size")]
    if not all(isinstance(size, int) and size > 0 for size in sizes):
        return None
    layers, hidden, intermediate = sizes
    per_layer = 6 * hidden + 4 * intermediate
    per_token = layers * hidden + per_layer if checkpointing else layers * per_layer
    weight = next(model.parameters())
    weights = sum(p.numel() for p in model.parameters())
    tokens = max(weights / per_token, MIN_ACTIVATION_BYTES / (per_token * weight.element_size()))
    return math.ceil(tokens / 64) * 64


def token_micro_batches(tokens: list[int], budget: int, count: int = 1) -> list[list[int]]:
    """Positions (into ``tokens``, each a pair's token count) grouped into micro-batches of at most
    ``budget`` tokens, first-fit decreasing (a pair over the budget alone), then the fullest ones
    halved until there are at least ``count`` (what every rank must run under FSDP2: the largest
    count any rank needs). Deterministic: the same on every rank."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        fit = next((b for b, left in enumerate(room) if tokens[i] <= left), None)
        if fit is None:
            bins.append([i])
            room.append(budget - tokens[i])
        else:
            bins[fit].append(i)
            room[fit] -= tokens[i]
    while len(bins) < min(count, len(tokens)):
        b = max((b for b in range(len(bins)) if len(bins[b]) > 1), key=lambda b: sum(tokens[i] for i in bins[b]))
        pairs = bins.pop(b)
        bins[b:b] = [pairs[0::2], pairs[1::2]]  # longest first in each half
    return bins


def token_count(split: Split, index: list[int]) -> int:
    """Tokens a forward pass over the pairs ``index`` computes (the prompt counted for both responses)."""
    return sum(2 * len(split.prompts[i]) + len(split.chosens[i]) + len(split.rejecteds[i]) for i in index)
