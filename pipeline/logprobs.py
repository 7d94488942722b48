"""Per-token log-probs of response tokens: the ONE implementation, used by scoring and training.

A response token y_j (0-based) of a sequence ``prompt + response`` with prompt length P sits at
position P + j and is predicted from the hidden state at position P + j - 1. So:

    log pi(y | x) = sum_j log_softmax(lm_head(h[P + j - 1]))[y_j]

Only the hidden states at response positions go through the LM head, and the log-softmax runs
in float32 on those rows alone, in chunks: the float32 logits of the whole batch,
[batch, seq, vocab], are never materialized (for a 49k vocabulary and 8k tokens that alone
would be 1.6 GB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows of the LM head's output turned into float32 log-probs at once: bounds the float32
# temporaries to LOGSOFTMAX_CHUNK x vocab (e.g. 2048 x 49152 x 4 B = 400 MB).
LOGSOFTMAX_CHUNK = 2048


@dataclass
class PackedBatch:
    """Right-padded sequences plus where their response tokens are.

    input_ids: [B, T]
    attention_mask: [B, T] padding mask, or [B, 1, T, T] bool (True = may attend) for
        prefix-shared rows, which also carry position_ids [B, T].
    rows, cols: [N] position (batch row, time step) of the hidden state predicting each
        response token, in response order, response after response.
    targets: [N] the response token ids.
    lengths: [S] tokens per response; sum(lengths) == N.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    lengths: list[int]
    position_ids: torch.Tensor | None = None

    def to(self, device) -> "PackedBatch":
        return PackedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.rows.to(device),
            self.cols.to(device),
            self.targets.to(device),
            self.lengths,
            None if self.position_ids is None else self.position_ids.to(device),
        )


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PackedBatch:
    """Build a right-padded batch of ``prompt + response`` sequences.

    Right padding keeps position ids 0..len-1 for real tokens, so results do not depend on how
    much padding a batch carries (only on floating-point summation order).
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("pack needs as many prompts as responses, at least one")
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
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


def pack_shared(
    prompts: list[list[int]], chosens: list[list[int]], rejecteds: list[list[int]], pad_id: int
) -> PackedBatch:
    """One row per example, ``prompt + chosen + rejected``, the prompt computed once for both.

    The rejected tokens get the positions they would have right after the prompt
    (P .. P+Rr-1) and an attention mask that hides the chosen tokens from them, so every
    response sees exactly ``prompt + its own earlier tokens``, as in two separate sequences,
    while the prompt's work is done once. Lengths come in pairs: chosen_b, rejected_b, ...
    """
    if not (len(prompts) == len(chosens) == len(rejecteds)) or not prompts:
        raise ValueError("pack_shared needs equally many prompts, chosen and rejected, at least one")
    totals = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosens, rejecteds)]
    width = max(totals)
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    # Padding rows attend to themselves only: a query with nothing to attend to gives NaN.
    mask = torch.eye(width, dtype=torch.bool).repeat(batch, 1, 1, 1)  # [B, 1, T, T]
    rows, cols, targets, lengths = [], [], [], []
    for b, (prompt, chosen, rejected) in enumerate(zip(prompts, chosens, rejecteds)):
        if not prompt:
            raise ValueError("every sequence needs at least one prompt token to condition on")
        P, C, R, T = len(prompt), len(chosen), len(rejected), totals[b]
        input_ids[b, :T] = torch.tensor(prompt + chosen + rejected, dtype=torch.long)
        position_ids[b, :T] = torch.cat(
            [torch.arange(P + C), torch.arange(P, P + R)]
        )
        index = torch.arange(T)
        causal = index[:, None] >= index[None, :]
        is_chosen = (index >= P) & (index < P + C)
        is_rejected = index >= P + C
        mask[b, 0, :T, :T] = causal & ~(is_rejected[:, None] & is_chosen[None, :])
        # Response token j is predicted by the hidden state just before it in its own stream:
        # the last prompt token for j == 0.
        chosen_cols = torch.cat([torch.tensor([P - 1]), torch.arange(P, P + C - 1)])
        rejected_cols = torch.cat([torch.tensor([P - 1]), torch.arange(P + C, P + C + R - 1)])
        for response, response_cols in ((chosen, chosen_cols[:C]), (rejected, rejected_cols[:R])):
            rows.append(torch.full((len(response),), b, dtype=torch.long))
            cols.append(response_cols)
            targets.append(torch.tensor(response, dtype=torch.long))
            lengths.append(len(response))
    return PackedBatch(
        input_ids, mask, torch.cat(rows), torch.cat(cols), torch.cat(targets), lengths, position_ids
    )


def token_logps(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    targets: torch.Tensor,
    lm_head,
    logit_transform=None,
) -> torch.Tensor:
    """log p(target | context) at the given positions, in float32.

    hidden: [B, T, H] last hidden states (any dtype); rows, cols, targets: [N];
    lm_head: maps [n, H] -> [n, V]; logit_transform: optional function applied to those logits
    (e.g. a model's final soft-capping). Returns [N] float32. Differentiable.
    """
    selected = hidden[rows, cols]  # [N, H]
    out = []
    for start in range(0, selected.shape[0], LOGSOFTMAX_CHUNK):
        logits = lm_head(selected[start : start + LOGSOFTMAX_CHUNK])
        if logit_transform is not None:
            logits = logit_transform(logits)
        logps = torch.log_softmax(logits.float(), dim=-1)  # [n, V] float32
        chunk_targets = targets[start : start + LOGSOFTMAX_CHUNK].unsqueeze(-1)
        out.append(logps.gather(-1, chunk_targets).squeeze(-1))
    if not out:
        return hidden.new_zeros((0,), dtype=torch.float32)
    return torch.cat(out)


def _logit_transform(model):
    """The model's own post-processing of logits, when it has one we know."""
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)
    if softcap:
        return lambda logits: torch.tanh(logits / softcap) * softcap
    if isinstance(scale, (int, float)) and scale != 1:
        return lambda logits: logits * scale
    return None


def _attention_mask(model, mask: torch.Tensor) -> torch.Tensor:
    if mask.ndim == 2:
        return mask
    # A custom 4D mask goes to the attention kernel as is: bool (True = attend) for SDPA and
    # flex, additive float for eager attention.
    if model.config._attn_implementation == "eager":
        dtype = model.get_output_embeddings().weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return mask


def supports_shared_prefix(model) -> bool:
    """Whether the model's attention takes a custom 4D mask (flash-attention kernels do not)."""
    return model.config._attn_implementation in ("sdpa", "eager", "flex_attention")


def response_logps(model, batch: PackedBatch) -> torch.Tensor:
    """[N] float32 per-token log-probs of the batch's response tokens under ``model``."""
    decoder = model.get_decoder()
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=_attention_mask(model, batch.attention_mask),
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    return token_logps(
        hidden,
        batch.rows,
        batch.cols,
        batch.targets,
        model.get_output_embeddings(),
        _logit_transform(model),
    )


def check_head_path(model, token_ids: list[int]) -> float:
    """Compare ``response_logps`` with the model's own full forward on one short sequence.

    Catches architectures whose logits get post-processing this module does not know about.
    Returns the max |difference| (nats); the caller decides what is too much.
    """
    ids = token_ids[:16]
    if len(ids) < 2:
        raise ValueError("need at least two tokens")
    batch = pack([ids[:1]], [ids[1:]], pad_id=0)
    device = next(model.parameters()).device
    batch = batch.to(device)
    with torch.inference_mode():
        ours = response_logps(model, batch)
        logits = model(input_ids=batch.input_ids, use_cache=False).logits[0, :-1].float()
        reference = torch.log_softmax(logits, dim=-1).gather(
            -1, batch.input_ids[0, 1:].unsqueeze(-1)
        ).squeeze(-1)
    return float((ours - reference).abs().max())



def sequence_sums(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[S] float32 sums of consecutive runs of ``values`` ([N]) of the given lengths."""
    index = torch.repeat_interleave(
        torch.arange(len(lengths), device=values.device),
        torch.tensor(lengths, device=values.device),
    )
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

    def forward(self, input_ids, attention_mask, rows, cols, targets, position_ids=None):
        batch = PackedBatch(input_ids, attention_mask, rows, cols, targets, [], position_ids)
        return response_logps(self.model, batch)


def _logps(model, batch: PackedBatch) -> torch.Tensor:
    if hasattr(model, "get_decoder"):  # a causal LM (or a peft model around one)
        return response_logps(model, batch)
    # a ResponseLogps, possibly wrapped by DDP / fully_shard
    return model(batch.input_ids, batch.attention_mask, batch.rows, batch.cols, batch.targets,
                 batch.position_ids)


def pair_logps(model, prompts, chosens, rejecteds, shared: bool = True, device="cpu"):
    """Sequence log-probs of both responses of each pair in ONE forward pass.

    model: a causal LM, or a ``ResponseLogps`` around one (wrapped by DDP or FSDP2 or not).
    shared: one row per pair (prompt computed once, see pack_shared); else the chosen and the
    rejected sequences as rows of the same batch. Returns (chosen [B], rejected [B]) float32
    sums, differentiable.
    """
    if shared:
        batch = pack_shared(prompts, chosens, rejecteds, pad_id=0).to(device)
        sums = sequence_sums(_logps(model, batch), batch.lengths)
        return sums[0::2], sums[1::2]
    batch = pack(prompts + prompts, chosens + rejecteds, pad_id=0).to(device)
    sums = sequence_sums(_logps(model, batch), batch.lengths)
    return sums[: len(prompts)], sums[len(prompts) :]
