"""The train stage's loss: a micro-batch's DPO loss (TRL's losses, pipeline/logprobs/losses.py) from the
policy's log-probs and the cached reference's, with LD-DPO's and WPO's weighting, and the sums of
its metrics.

    policy = PolicyLogps(chosen, rejected, weights)          # [B] each (Trainer.loss_inputs)
    loss, sums = compute_loss(cfg, split, index, policy, scale, reference=cached_reference)

The metric sums stay 0-dim tensors on the policy's device (no host sync per micro-batch): the
caller adds them up (``add_sums``, in float64) and reads them together (``read_sums``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.config.schema import Config
from pipeline.logprobs.response import PairTokens
from pipeline.logprobs.losses import LOSSES, PairLogps, combined_loss, rewards
from pipeline.train.batches import Split, TrainError


@dataclass
class PolicyLogps:
    """The policy's side of a micro-batch: chosen, rejected [B] float32 sequence log-probs, and
    the pair weights [B] (no gradient) multiplying each pair's loss, or None (WPO's: ``wpo_weights``)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    weights: torch.Tensor | None = None


def cached_reference(split: Split, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of the pairs ``index`` from the cache: [B] float64 each. A split without
    reference (a reference-free run) gives NaN: the reference-free losses and their rewards never
    read it, and anything that did would stop the run as non-finite."""
    if split.ref_chosen is None or split.ref_rejected is None:
        missing = torch.full((len(index),), float("nan"), dtype=torch.float64)
        return missing, missing.clone()
    return split.ref_chosen[index], split.ref_rejected[index]


def compute_loss(cfg: Config, split: Split, index: list[int], policy: PolicyLogps, scale: float,
                 reference: Callable = cached_reference):
    """Loss of a micro-batch (scaled by ``scale``) and the per-pair sums of its metrics (0-dim
    tensors on the policy's device).

    policy: [B] float32 sequence log-probs under the policy, and the pair weights. The loss is
    sum_k train.loss_weights[k] x train.loss_type[k] (TRL's mixture), each loss getting the summed
    log-probs and the response token counts (length-normalized losses divide by them themselves).
    """
    train_cfg = cfg.train
    policy_chosen, policy_rejected = policy.chosen, policy.rejected
    device = policy_chosen.device
    ref_chosen, ref_rejected = (v.to(device, torch.float32) for v in reference(split, index))
    names = train_cfg.loss_names()
    chosen_len = torch.tensor([len(split.chosens[i]) for i in index], device=device, dtype=torch.float32)
    rejected_len = torch.tensor([len(split.rejecteds[i]) for i in index], device=device, dtype=torch.float32)
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
    if policy.weights is not None:  # TRL weights each loss of the mixture, before the RPO term
        per_pair = per_pair * policy.weights.to(per_pair.dtype)
    if train_cfg.rpo_alpha:
        per_pair = per_pair + train_cfg.rpo_alpha * (-policy.chosen / chosen_len)
    if all(LOSSES[name].reference_free for name in names):
        # TRL's CPO / ORPO trainers: beta x the (length-normalized) policy log-prob.
        reward_chosen = train_cfg.beta * policy_chosen / chosen_len.clamp(min=1.0)
        reward_rejected = train_cfg.beta * policy_rejected / rejected_len.clamp(min=1.0)
    else:  # TRL's DPOTrainer: beta x the summed log-ratio, whatever the loss
        reward_chosen = rewards(policy_chosen, ref_chosen, train_cfg.beta)
        reward_rejected = rewards(policy_rejected, ref_rejected, train_cfg.beta)
    return per_pair.sum() * scale, _metric_sums(per_pair, policy, reward_chosen, reward_rejected)


def _metric_sums(per_pair, policy: PolicyLogps, reward_chosen, reward_rejected) -> dict[str, torch.Tensor]:
    """The micro-batch's metric sums over its pairs, as 0-dim tensors (no host sync)."""
    return {
        "loss": per_pair.detach().sum(),
        "rewards/chosen": reward_chosen.detach().sum(),
        "rewards/rejected": reward_rejected.detach().sum(),
        "rewards/accuracies": (reward_chosen > reward_rejected).float().sum(),
        "rewards/margins": (reward_chosen - reward_rejected).detach().sum(),
        "logps/chosen": policy.chosen.detach().sum(),
        "logps/rejected": policy.rejected.detach().sum(),
    }


def read_sums(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors as Python floats, in one transfer (float64: the precision their sums were kept in)."""
    if not values:
        return {}
    device = next(iter(values.values())).device
    stacked = torch.stack([value.to(device, torch.float64) for value in values.values()])
    return dict(zip(values, stacked.tolist()))


def add_sums(totals: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``totals`` plus ``sums``, key by key, in float64 on the device (what adding their values as
    Python floats gives, without reading them)."""
    for key, value in sums.items():
        value = value.detach().to(torch.float64)
        totals[key] = totals[key] + value if key in totals else value
    return totals


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


def token_count(split: Split, index: list[int]) -> int:
    """Tokens a forward pass over the pairs ``index`` computes (the prompt counted for both responses)."""
    return sum(2 * len(split.prompts[i]) + len(split.chosens[i]) + len(split.rejecteds[i]) for i in index)
