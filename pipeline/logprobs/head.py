"""Fused LM-head log-probs: log p(target | h) for N hidden states, chunk by chunk, without keeping
any [tokens x vocab] tensor for the backward.

    values = fused_logps(selected, targets, LinearHead(weight, bias, softcap, scale))  # [N] float32
    values, log_sum_sq = fused_logps(selected, targets, head, log_sum_sq=True)         # + WPO's [N]

Plain autograd over ``log_softmax(lm_head(h)).gather(y)`` keeps, for each chunk of response
positions, the float32 log-softmax ([n x vocab], 4 B per entry: 200 MB for 1,024 tokens of a
49k vocabulary, 525 MB for a 128k one) until the backward. Here the forward keeps only the
per-token logsumexp ([N] float32); the backward recomputes each chunk's logits and turns them
into gradients at once:

    d log p(y | h) / d logits = onehot(y) - softmax(logits)
    grad_logits = g * (onehot(y) - exp(logits - lse))          (g: the upstream [n] gradient)
    grad_h = grad_logits @ W,  grad_W += grad_logits^T @ h,  grad_b += sum_rows grad_logits

(times the soft-capping's derivative 1 - tanh^2 when the model caps its logits, times the scale
when it scales them). One more LM-head matmul than plain autograd (the recompute), and at any
time at most one chunk's [n x vocab] float32 in memory.

Matmuls run in the dtype autocast would give (bfloat16 under bf16-mixed), the softmax in float32;
gradients come back in the dtype of ``h`` and of the weight (float32 master weights stay float32).
Heads that are not a plain ``nn.Linear`` (LoRA on the LM head) take ``checkpointed_logps``: the same
chunks under activation checkpointing, any module, the same memory bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Rows of the LM head's output turned into float32 log-probs at once: bounds the float32
# temporaries to a few CHUNK x vocab (e.g. 1024 x 49152 x 4 B = 200 MB each).
CHUNK = 1024


@dataclass(frozen=True)
class LinearHead:
    """An LM head ``logits = cap(scale x (h @ weight^T + bias))``: weight [V, H], bias [V] or None;
    ``softcap``: cap(z) = softcap x tanh(z / softcap) (Gemma 2), None for none; ``scale``: the
    model's logit scale (Cohere), 1 for none."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    scale: float = 1.0


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on for the weight's device, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _logits(h, weight, bias, head: LinearHead):
    """float32 logits of a chunk (matmul in the weight's compute dtype) and tanh(z / cap) or None."""
    logits = F.linear(h, weight, bias).float()
    if head.scale != 1:
        logits = logits * head.scale
    if head.softcap is None:
        return logits, None
    capped = torch.tanh(logits / head.softcap)
    return capped * head.softcap, capped


@dataclass(frozen=True)
class _Plan:
    head: LinearHead
    chunk: int
    log_sum_sq: bool


class _FusedHeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan: _Plan):
        head, chunk, log_sum_sq = plan.head, plan.chunk, plan.log_sum_sq
        dtype = _compute_dtype(weight)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        N = hidden.shape[0]
        values = hidden.new_empty(N, dtype=torch.float32)
        lse = hidden.new_empty(N, dtype=torch.float32)
        squares = hidden.new_empty(N if log_sum_sq else 0, dtype=torch.float32)
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            logits, _ = _logits(h[start:end], w, b, head)
            norm = torch.logsumexp(logits, dim=-1)
            lse[start:end] = norm
            values[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1) - norm
            if log_sum_sq:  # log sum_v p^2 = logsumexp(2 x log p)
                squares[start:end] = torch.logsumexp(2 * (logits - norm[:, None]), dim=-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.plan, ctx.dtype = plan, dtype
        ctx.mark_non_differentiable(squares)
        return values, squares

    @staticmethod
    def backward(ctx, grad_values, _grad_squares):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        head, chunk, dtype = ctx.plan.head, ctx.plan.chunk, ctx.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        grad_values = grad_values.float()
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            g = grad_values[start:end, None]
            logits, capped = _logits(h[start:end], w, b, head)
            grad = logits.sub_(lse[start:end, None]).exp_().mul_(-g)  # -g x softmax, in place
            grad.scatter_add_(-1, targets[start:end, None], g)  # + g x onehot(y)
            if capped is not None:  # d cap(z) / dz = 1 - tanh^2(z / cap)
                grad.mul_(1 - capped * capped)
            if head.scale != 1:
                grad.mul_(head.scale)
            grad_low = grad.to(dtype)
            if want_h:
                grad_h[start:end] = grad_low @ w
            if want_w and dtype == torch.float32:
                grad_w.addmm_(grad_low.t(), h[start:end])
            elif want_w:
                grad_w.add_((grad_low.t() @ h[start:end]).float())
            if want_b:
                grad_b.add_(grad.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def fused_logps(hidden: torch.Tensor, targets: torch.Tensor, head: LinearHead, log_sum_sq: bool = False,
                chunk: int | None = None):
    """[N] float32 log p(targets | hidden) through ``head`` (and with ``log_sum_sq`` also the [N]
    log sum_v p(v | hidden)^2, without gradient): hidden [N, H], targets [N] long."""
    plan = _Plan(head, chunk or CHUNK, log_sum_sq)
    values, squares = _FusedHeadLogps.apply(hidden, head.weight, head.bias, targets, plan)
    return (values, squares) if log_sum_sq else values


def _chunk_logps(lm_head, hidden, targets, log_sum_sq: bool):
    logps = torch.log_softmax(lm_head(hidden).float(), dim=-1)  # [n, V] float32
    values = logps.gather(-1, targets[:, None]).squeeze(-1)
    if not log_sum_sq:
        return values, None
    with torch.no_grad():
        return values, torch.logsumexp(2 * logps, dim=-1)


def checkpointed_logps(hidden: torch.Tensor, targets: torch.Tensor, lm_head, log_sum_sq: bool = False,
                       chunk: int | None = None, recompute: bool = True):
    """``fused_logps`` for any ``lm_head`` ([n, H] -> [n, V] logits, post-processing included):
    each chunk under activation checkpointing (``recompute``), or under plain autograd (keeps
    every chunk's [n x V] float32 log-softmax for the backward: ``train.fused_lm_head: false``)."""
    chunk = chunk or CHUNK
    keep = torch.is_grad_enabled() and hidden.requires_grad and recompute
    out, squares = [], []
    for start in range(0, hidden.shape[0], chunk):
        args = (lm_head, hidden[start : start + chunk], targets[start : start + chunk], log_sum_sq)
        values, square = checkpoint(_chunk_logps, *args, use_reentrant=False) if keep else _chunk_logps(*args)
        out.append(values)
        squares.append(square)
    empty = hidden.new_zeros((0,), dtype=torch.float32)
    values = torch.cat(out) if out else empty
    if log_sum_sq:
        return values, (torch.cat(squares) if squares else empty)
    return values


# --- the loss inside the head: gradients in the forward, as Liger's fused linear losses ---------


@dataclass(frozen=True)
class LossPlan:
    """A loss over pairs that ``fused_loss`` computes chunk by chunk of whole pairs.

    loss_fn(pairs, values, lengths, log_sum_sq) -> (loss, sums): the loss (0-dim, differentiable in
    ``values``) and 0-dim metric sums of the pairs ``pairs`` (a range) from their per-token
    log-probs ``values`` [n] (responses chosen, rejected, chosen, ... of ``lengths``) and, when
    ``log_sum_sq``, their log sum_v p^2 (no gradient). The loss over all pairs must be the sum of
    the chunks' losses (every DPO-family loss here: per-pair terms, summed).
    lengths: tokens of each response, two per pair, in pair order.
    """

    loss_fn: Callable
    lengths: list[int]
    log_sum_sq: bool = False
    chunk: int = CHUNK


def pair_chunks(lengths: list[int], chunk: int) -> list[tuple[int, int, int, int]]:
    """(first pair, end pair, first token, end token) of runs of whole pairs of about ``chunk``
    tokens (a pair longer than that alone)."""
    out, pair0, tok0, tok = [], 0, 0, 0
    pairs = len(lengths) // 2
    for i in range(pairs):
        size = lengths[2 * i] + lengths[2 * i + 1]
        if tok > tok0 and tok + size - tok0 > chunk:
            out.append((pair0, i, tok0, tok))
            pair0, tok0 = i, tok
        tok += size
    if pairs:
        out.append((pair0, pairs, tok0, tok))
    return out


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec):
        head, plan, sums_out = spec
        dtype = _compute_dtype(weight)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        total = hidden.new_zeros((), dtype=torch.float32)
        for pair0, pair1, tok0, tok1 in pair_chunks(plan.lengths, plan.chunk):
            grad, loss, sums = _chunk_gradient(h[tok0:tok1], (w, b), targets[tok0:tok1], head,
                                               (plan, range(pair0, pair1)))
            total = total + loss
            for key, value in sums.items():
                sums_out[key] = sums_out[key] + value if key in sums_out else value
            low = grad.to(dtype)
            grad_h[tok0:tok1] = low @ w
            if dtype == torch.float32:
                grad_w.addmm_(low.t(), h[tok0:tok1])
            else:
                grad_w.add_((low.t() @ h[tok0:tok1]).float())
            if grad_b is not None:
                grad_b.add_(grad.sum(0))
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda t: None if t is None else t * grad_loss.to(t.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None


def _chunk_gradient(h, weights, targets, head: LinearHead, job):
    """One chunk of whole pairs: its loss, metric sums and d loss / d logits ([n, V] float32, in
    the logits' own buffer: one [n x V] float32 at a time, two with soft-capping).

    The loss's gradient w.r.t. each token's log-prob, g ([n], autograd over the loss alone), then
    d loss / d logits = g x (onehot(y) - softmax), as in _FusedHeadLogps.backward."""
    plan, pairs = job
    w, b = weights
    with torch.no_grad():
        logits, capped = _logits(h, w, b, head)
        norm = torch.logsumexp(logits, dim=-1)
        values = logits.gather(-1, targets[:, None]).squeeze(-1) - norm
        squares = torch.logsumexp((logits - norm[:, None]).mul_(2), dim=-1) if plan.log_sum_sq else None
    with torch.enable_grad():
        leaf = values.requires_grad_()
        lengths = plan.lengths[2 * pairs.start : 2 * pairs.stop]
        loss, sums = plan.loss_fn(pairs, leaf, lengths, squares)
        (g,) = torch.autograd.grad(loss, leaf)
    g = g[:, None]
    grad = logits.sub_(norm[:, None]).exp_().mul_(-g)  # -g x softmax, in place
    grad.scatter_add_(-1, targets[:, None], g)  # + g x onehot(y)
    if capped is not None:  # d cap(z) / dz = 1 - tanh^2(z / cap)
        grad.mul_(1 - capped * capped)
    if head.scale != 1:
        grad.mul_(head.scale)
    return grad, loss.detach().float(), {key: value.detach() for key, value in sums.items()}


def fused_loss(hidden: torch.Tensor, targets: torch.Tensor, head: LinearHead, plan: LossPlan):
    """(loss, metric sums) of ``plan.loss_fn`` over all pairs, their log-probs through ``head``,
    computed chunk of pairs by chunk of pairs with its gradients (w.r.t. hidden, weight, bias) in
    the forward: three head matmuls per chunk, as plain autograd, and no [tokens x vocab] tensor
    kept. hidden [N, H] (the response positions), targets [N]; the loss is differentiable."""
    sums: dict = {}
    loss = _FusedHeadLoss.apply(hidden, head.weight, head.bias, targets, (head, plan, sums))
    return loss, sums
