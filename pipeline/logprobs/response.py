"""Per-token log-probs of response tokens: the ONE implementation, used by scoring and training.

A response token y_j (0-based) of a sequence ``prompt + response`` with prompt length P sits at
position P + j and is predicted from the hidden state at position P + j - 1. So:

    log pi(y | x) = sum_j log_softmax(lm_head(h[P + j - 1]))[y_j]

Only the hidden states at response positions go through the LM head, and the log-softmax runs
in float32 on those rows alone, in chunks: the float32 logits of the whole batch,
[batch, seq, vocab], are never materialized (for a 49k vocabulary and 8k tokens that alone
would be 1.6 GB), and for the backward only each token's logsumexp is kept (head.py:
the fused LM head recomputes each chunk's logits there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.logprobs.head import CHUNK, LinearHead, LossPlan, checkpointed_logps, fused_logps, fused_loss

# Rows of the LM head's output turned into float32 log-probs at once (head.CHUNK).
LOGSOFTMAX_CHUNK = CHUNK


@dataclass
class PackedBatch:
    """Token rows plus where their response tokens are.

    input_ids: [B, T]
    attention_mask: [B, T] padding mask of ``pack``'s one-sequence-per-row batches; None for pair
        batches, whose attention follows from ``segments``.
    rows, cols: [N] position (batch row, time step) of the hidden state predicting each
        response token, in response order, response after response.
    targets: [N] the response token ids.
    lengths: [S] tokens per response; sum(lengths) == N.
    position_ids: [B, T] for pair batches (restarting at 0 for each pair).
    segments: [B, T] for pair batches: 4 x (pair's slot in its row) + part (0 prompt, 1 chosen,
        2 rejected); -1 at padding. ``attention_masks`` turns it into the kernel's mask.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    lengths: list[int]
    position_ids: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    def to(self, device) -> "PackedBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.attention_mask), move(self.rows), move(self.cols),
                           move(self.targets), self.lengths, move(self.position_ids), move(self.segments))


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
         pad_to_multiple_of: int | None = None) -> PackedBatch:
    """Build a right-padded batch of ``prompt + response`` sequences.

    Right padding keeps position ids 0..len-1 for real tokens, so results do not depend on how
    much padding a batch carries (only on floating-point summation order).
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("pack needs as many prompts as responses, at least one")
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = padded_width(max(len(s) for s in seqs), pad_to_multiple_of)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, targets, lengths = [], [], [], []
    for b, (prompt, response, seq) in enumerate(zip(prompts, responses, seqs)):
        if not prompt:
            raise ValueError("every sequence needs at least one prompt token to condition on")
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, : len(seq)] = 1
        rows.append(torch.full((len(response),), b, dtype=torch.long))
        cols.append(torch.arange(len(prompt) - 1, len(seq) - 1, dtype=torch.long))
        targets.append(torch.tensor(response, dtype=torch.long))
        lengths.append(len(response))
    return PackedBatch(
        input_ids, attention_mask, torch.cat(rows), torch.cat(cols), torch.cat(targets), lengths
    )


def padded_width(width: int, multiple: int | None) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (None: as is): padding at the end of the
    rows, so that a compiled model sees a few shapes."""
    return width if not multiple else -(-width // multiple) * multiple


PACKING = ("none", "fit", "flat")
"""How pair batches are laid out (``pack_pairs``):
none: one pair per row, right-padded to the longest (the layout before padding-free batches);
fit: pairs first-fit into rows as long as the longest pair, longest first: padding only at the end
    of a row, and the attention work of each row bounded by the longest pair's (for kernels that
    compute masked blocks: SDPA, eager);
flat: all pairs in one row, no padding at all (for block-sparse kernels that skip what the mask
    hides: FlexAttention)."""


def plan_rows(totals: list[int], packing: str = "fit") -> list[list[int]]:
    """Pair indices of each row: first-fit decreasing into rows of the longest pair's length
    (``fit``), one row (``flat``), or one pair per row (``none``)."""
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {PACKING}, not {packing!r}")
    if packing == "none":
        return [[i] for i in range(len(totals))]
    if packing == "flat":
        return [list(range(len(totals)))]
    capacity = max(totals)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(totals)), key=lambda i: (-totals[i], i)):
        for r, left in enumerate(room):
            if totals[i] <= left:
                rows[r].append(i)
                room[r] -= totals[i]
                break
        else:
            rows.append([i])
            room.append(capacity - totals[i])
    return rows


def pack_pairs(
    prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]], pad_id: int = 0,
    packing: str = "fit", pad_to_multiple_of: int | None = None,
) -> PackedBatch:
    """Pairs as ``prompt + chosen + rejected`` runs, the prompt computed once for both, several
    pairs per row (``packing``, see PACKING).

    In each pair the rejected tokens get the positions they would have right after the prompt
    (P .. P+R-1) and may not see the chosen tokens; no token sees another pair. So every
    response sees exactly ``prompt + its own earlier tokens``, as in two separate sequences,
    while the prompt's work is done once and rows carry no padding but at their end. Response
    order (``lengths``, ``rows``/``cols``/``targets``) is pair order whatever the rows:
    chosen_0, rejected_0, chosen_1, ...
    """
    if not (len(prompts) == len(chosens) == len(rejecteds)) or not prompts:
        raise ValueError("pack_pairs needs equally many prompts, chosen and rejected, at least one")
    if not all(prompts):
        raise ValueError("every sequence needs at least one prompt token to condition on")
    totals = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosens, rejecteds)]
    layout = plan_rows(totals, packing)
    width = padded_width(max(sum(totals[i] for i in row) for row in layout), pad_to_multiple_of)
    input_ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(layout), width), dtype=torch.long)
    segments = torch.full((len(layout), width), -1, dtype=torch.long)
    place = [(0, 0)] * len(prompts)  # (row, start) of each pair
    for b, row in enumerate(layout):
        start = 0
        for slot, i in enumerate(row):
            P, C, R = len(prompts[i]), len(chosens[i]), len(rejecteds[i])
            end = start + P + C + R
            input_ids[b, start:end] = torch.tensor(prompts[i] + chosens[i] + rejecteds[i], dtype=torch.long)
            position_ids[b, start:end] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
            segments[b, start:end] = torch.tensor([4 * slot] * P + [4 * slot + 1] * C + [4 * slot + 2] * R)
            place[i] = (b, start)
            start = end
    rows, cols, targets, lengths = [], [], [], []
    for i, (b, s) in enumerate(place):
        P, C, R = len(prompts[i]), len(chosens[i]), len(rejecteds[i])
        # Response token j is predicted by the hidden state just before it in its own stream:
        # the last prompt token for j == 0.
        chosen_cols = torch.cat([torch.tensor([s + P - 1]), torch.arange(s + P, s + P + C - 1)])[:C]
        rejected_cols = torch.cat([torch.tensor([s + P - 1]), torch.arange(s + P + C, s + P + C + R - 1)])[:R]
        for response, response_cols in ((chosens[i], chosen_cols), (rejecteds[i], rejected_cols)):
            rows.append(torch.full((len(response),), b, dtype=torch.long))
            cols.append(response_cols)
            targets.append(torch.tensor(response, dtype=torch.long))
            lengths.append(len(response))
    return PackedBatch(input_ids, None, torch.cat(rows), torch.cat(cols), torch.cat(targets), lengths,
                       position_ids, segments)


def dense_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool (True = may attend) of a pair batch: causal within a pair, the rejected
    tokens blind to the chosen ones, nothing across pairs; padding attends to itself only (a
    query with nothing to attend to gives NaN)."""
    T = segments.shape[1]
    pair, part = segments // 4, segments % 4
    index = torch.arange(T, device=segments.device)
    causal = index[:, None] >= index[None, :]
    same = (pair[:, :, None] == pair[:, None, :]) & (segments >= 0)[:, :, None]
    blind = (part == 2)[:, :, None] & (part == 1)[:, None, :]
    mask = (same & causal & ~blind) | torch.eye(T, dtype=torch.bool, device=segments.device)
    return mask[:, None]


def flex_block_mask(segments: torch.Tensor):
    """The same rule as ``dense_mask`` as a FlexAttention BlockMask: blocks the rule hides
    entirely (other pairs, the future) are skipped, not computed and masked."""
    from torch.nn.attention.flex_attention import create_block_mask

    pair, part = segments // 4, segments % 4
    real = segments >= 0

    def mask_mod(b, h, q, kv):
        same = (pair[b, q] == pair[b, kv]) & real[b, q] & (kv <= q)
        return (same & ~((part[b, q] == 2) & (part[b, kv] == 1))) | (q == kv)

    B, T = segments.shape
    return create_block_mask(mask_mod, B, None, T, T, device=segments.device,
                             _compile=segments.device.type == "cuda")


@dataclass(frozen=True)
class HeadOptions:
    """What the LM head computes: ``log_sum_sq``: also each position's log sum_v p^2 (WPO's
    weights); ``fused``: the fused LM head (head.py), else plain autograd over chunks;
    ``loss_fn`` (with the responses' ``lengths``): the loss of the pairs instead of their log-probs
    (``pair_loss``: with ``fused``, computed inside the head, gradients in the forward)."""

    log_sum_sq: bool = False
    fused: bool = True
    loss_fn: Callable | None = None
    lengths: tuple = ()


def token_logps(hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor, lm_head,
                options: HeadOptions = HeadOptions()):
    """log p(target | context) at the given positions, in float32.

    hidden: [B, T, H] last hidden states (any dtype); rows, cols, targets: [N];
    lm_head: a ``head.LinearHead`` (the fused path: no [N x vocab] tensor kept for the
    backward), or any module mapping [n, H] -> [n, V] logits, the model's own post-processing of
    them included (``lm_head_of``): chunks under activation checkpointing, or with ``options.fused``
    false under plain autograd. Returns [N] float32, differentiable; with ``options.log_sum_sq`` also [N]
    log sum_v p(v | context)^2 (no gradient: WPO's weights).
    """
    selected = hidden[rows, cols]  # [N, H]
    log_sum_sq, fused = options.log_sum_sq, options.fused
    if isinstance(lm_head, LinearHead):
        if fused:
            return fused_logps(selected, targets, lm_head, log_sum_sq, LOGSOFTMAX_CHUNK)
        lm_head = _linear_module(lm_head)
    return checkpointed_logps(selected, targets, lm_head, log_sum_sq, LOGSOFTMAX_CHUNK, recompute=fused)


def _linear_module(head: LinearHead):
    """A LinearHead as a plain callable (the unfused path)."""
    def logits(hidden):
        out = torch.nn.functional.linear(hidden, head.weight, head.bias)
        if head.scale != 1:
            out = out * head.scale
        return out if head.softcap is None else torch.tanh(out / head.softcap) * head.softcap
    return logits


def _logit_transform(model):
    """The model's own post-processing of logits, when it has one we know: (softcap, scale)."""
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)
    return softcap or None, float(scale) if isinstance(scale, (int, float)) else 1.0


def lm_head_of(model):
    """The model's LM head with its post-processing of the logits: a LinearHead when the head is a
    plain nn.Linear (the fused path), else a callable (LoRA on the LM head, say)."""
    head = model.get_output_embeddings()
    softcap, scale = _logit_transform(model)
    if type(head) is torch.nn.Linear:
        return LinearHead(head.weight, head.bias, softcap, scale)

    def logits(hidden):
        out = head(hidden)
        if scale != 1:
            out = out * scale
        return out if softcap is None else torch.tanh(out / softcap) * softcap
    return logits


def attention_implementation(model) -> str:
    return model.config._attn_implementation


def _attention_mask(model, batch: PackedBatch):
    """The batch's mask as the model's attention kernel takes it: the 2D padding mask of
    one-sequence rows; for pair rows a BlockMask (flex), a [B, 1, T, T] bool (SDPA), or an
    additive float mask (eager)."""
    if batch.segments is None:
        return batch.attention_mask
    kind = attention_implementation(model)
    if kind == "flex_attention":
        return flex_block_mask(batch.segments)
    mask = dense_mask(batch.segments)
    if kind == "eager":
        dtype = model.get_output_embeddings().weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def supports_shared_prefix(model) -> bool:
    """Whether the model's attention takes a custom mask (flash-attention kernels do not)."""
    return attention_implementation(model) in ("sdpa", "eager", "flex_attention")


def default_packing(model) -> str:
    """The pair layout for this model's attention kernel: one flat row for FlexAttention (its
    block-sparse mask skips other pairs' blocks), rows as long as the longest pair otherwise
    (SDPA and eager compute every position of a row against every other, masked or not)."""
    return "flat" if attention_implementation(model) == "flex_attention" else "fit"


def response_logps(model, batch: PackedBatch, head: HeadOptions = HeadOptions()):
    """[N] float32 per-token log-probs of the batch's response tokens under ``model`` (and with
    ``head.log_sum_sq`` the [N] log sum_v p^2 of the same positions, see token_logps)."""
    decoder = model.get_decoder()
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=_attention_mask(model, batch),
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    if head.loss_fn is None:
        return token_logps(hidden, batch.rows, batch.cols, batch.targets, lm_head_of(model), head)
    lm_head, lengths = lm_head_of(model), list(head.lengths)
    if isinstance(lm_head, LinearHead) and head.fused:
        plan = LossPlan(head.loss_fn, lengths, head.log_sum_sq, LOGSOFTMAX_CHUNK)
        return fused_loss(hidden[batch.rows, batch.cols], batch.targets, lm_head, plan)
    out = token_logps(hidden, batch.rows, batch.cols, batch.targets, lm_head, head)
    values, squares = out if head.log_sum_sq else (out, None)
    return head.loss_fn(range(len(lengths) // 2), values, lengths, squares)


def sequence_sums(values: torch.Tensor, lengths: list[int], weights: torch.Tensor | None = None) -> torch.Tensor:
    """[S] sums of consecutive runs of ``values`` ([N]) of the given lengths (each value times
    its ``weights`` entry when given)."""
    index = torch.repeat_interleave(
        torch.arange(len(lengths), device=values.device),
        torch.tensor(lengths, device=values.device),
    )
    if weights is not None:
        values = values * weights.to(values.device, values.dtype)
    return torch.zeros(len(lengths), dtype=values.dtype, device=values.device).index_add(
        0, index, values
    )


class ResponseLogps(torch.nn.Module):
    """``response_logps`` of a causal LM as one module's forward, for the engines that need the
    whole computation inside a module call: DDP (its forward prepares the gradient all-reduce)
    and FSDP2 (the root's forward gathers the weights used outside the decoder layers: embedding,
    final norm, LM head)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, positions, position_ids=None, segments=None,
                head: HeadOptions = HeadOptions()):
        """positions: [3, N] the batch's rows, cols and targets, stacked (plain tensors: what the
        engines pass through and move as they should)."""
        rows, cols, targets = positions.unbind(0)
        batch = PackedBatch(input_ids, attention_mask, rows, cols, targets, [], position_ids, segments)
        return response_logps(self.model, batch, head)


def _logps(model, batch: PackedBatch, head: HeadOptions):
    if hasattr(model, "get_decoder"):  # a causal LM (or a peft model around one)
        return response_logps(model, batch, head)
    # a ResponseLogps, possibly wrapped by DDP / fully_shard
    positions = torch.stack((batch.rows, batch.cols, batch.targets))
    return model(batch.input_ids, batch.attention_mask, positions, batch.position_ids, batch.segments, head)


def _causal_lm(model):
    """The causal LM inside a ResponseLogps (wrapped by DDP / FSDP2 or not), or the model."""
    inner = getattr(model, "module", model)  # DDP
    return getattr(inner, "model", inner) if isinstance(inner, ResponseLogps) else inner


@dataclass
class PairTokens:
    """Per-token log-probs of the responses of B pairs: ``values`` [N] float32 (differentiable),
    responses in pair order chosen_0, rejected_0, chosen_1, ... with ``lengths`` [2B];
    ``log_sum_sq`` [N] (no gradient) when asked for."""

    values: torch.Tensor
    lengths: list[int]
    log_sum_sq: torch.Tensor | None = None

    def sums(self, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) sums, each token times its ``weights`` entry when given."""
        sums = sequence_sums(self.values, self.lengths, weights)
        return sums[0::2], sums[1::2]


@dataclass(frozen=True)
class PairOptions:
    """How ``pair_token_logps`` lays out and runs a batch of pairs.

    shared: prompt computed once per pair (``pack_pairs``, laid out by ``packing``: see PACKING;
    None: the model's kernel's ``default_packing``); else the chosen and the rejected sequences
    as rows of the same right-padded batch (kernels that take no custom mask).
    device: where the batch goes; log_sum_sq: also each position's log sum_v p^2 (WPO's weights);
    fused_head: the fused LM head (head.py; False: plain autograd, train.fused_lm_head);
    pad_to_multiple_of: rows padded to a multiple of this many tokens (a few shapes for a
    compiled model: train.pad_to_multiple_of).
    """

    shared: bool = True
    device: str = "cpu"
    packing: str | None = None
    log_sum_sq: bool = False
    fused_head: bool = True
    pad_to_multiple_of: int | None = None


def pair_token_logps(model, prompts, chosens, rejecteds, options: PairOptions = PairOptions()) -> PairTokens:
    """Per-token log-probs of both responses of each pair in ONE forward pass (laid out as
    ``options`` say).

    model: a causal LM, or a ``ResponseLogps`` around one (wrapped by DDP or FSDP2 or not).
    """
    log_sum_sq = options.log_sum_sq
    head = HeadOptions(log_sum_sq, options.fused_head)
    if options.shared:
        packing = options.packing or default_packing(_causal_lm(model))
        batch = pack_pairs(prompts, chosens, rejecteds, pad_id=0, packing=packing,
                           pad_to_multiple_of=options.pad_to_multiple_of).to(options.device)
        out = _logps(model, batch, head)
        values, squares = out if log_sum_sq else (out, None)
        return PairTokens(values, batch.lengths, squares)
    batch = pack(prompts + prompts, chosens + rejecteds, pad_id=0, pad_to_multiple_of=options.pad_to_multiple_of)
    batch = batch.to(options.device)
    out = _logps(model, batch, head)
    values, squares = out if log_sum_sq else (out, None)
    # rows are all chosen then all rejected: reorder the tokens into pair order
    B = len(prompts)
    offsets = [0, *torch.tensor(batch.lengths).cumsum(0).tolist()]
    order = torch.cat([torch.arange(offsets[k], offsets[k + 1]) for i in range(B) for k in (i, B + i)])
    order = order.to(values.device)
    lengths = [batch.lengths[k] for i in range(B) for k in (i, B + i)]
    return PairTokens(values[order], lengths, None if squares is None else squares[order])


def pair_logps(model, prompts, chosens, rejecteds, options: PairOptions = PairOptions()):
    """Sequence log-probs (chosen [B], rejected [B]) float32 sums, differentiable, of both
    responses of each pair in one forward pass (``pair_token_logps``)."""
    return pair_token_logps(model, prompts, chosens, rejecteds, options).sums()


def pair_loss(model, prompts, chosens, rejecteds, options: PairOptions, loss_fn: Callable):
    """(loss, metric sums) of ``loss_fn`` over B pairs in one forward pass: the trainer's
    ``objective.PairObjective``, or any function of ``head.LossPlan``'s contract. With
    options.fused_head inside the LM head, chunk of pairs by chunk of pairs, its gradients computed
    there (no [tokens x vocab] tensor kept, no recompute in the backward); else from
    ``pair_token_logps``'s values."""
    if not options.shared:
        tokens = pair_token_logps(model, prompts, chosens, rejecteds, options)
        return loss_fn(range(len(prompts)), tokens.values, tokens.lengths, tokens.log_sum_sq)
    packing = options.packing or default_packing(_causal_lm(model))
    batch = pack_pairs(prompts, chosens, rejecteds, pad_id=0, packing=packing,
                       pad_to_multiple_of=options.pad_to_multiple_of).to(options.device)
    head = HeadOptions(options.log_sum_sq, options.fused_head, loss_fn, tuple(batch.lengths))
    return _logps(model, batch, head)
