"""The training objective of a micro-batch of pairs: the DPO-family loss (losses.py, TRL's) with
LD-DPO's and WPO's weighting and the RPO term, computed from the policy's per-token log-probs,
and the sums of its metrics.

    objective = PairObjective(cfg.train, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, scale)
    loss, sums = pair_loss(model, prompts, chosens, rejecteds, options, objective)   # response.py
    loss, sums = objective(range(B), values, lengths, log_sum_sq)     # over per-token log-probs
    loss, sums = objective.loss(range(B), PolicyLogps(chosen, rejected))  # over sequence sums

A ``PairObjective`` holds all it reads besides the policy's log-probs (the reference's sequence
log-probs and the responses' token counts of the B pairs, read by the train stage once per
micro-batch), so the fused LM head (head.py) computes it chunk of pairs by chunk of pairs inside
its forward without calling back into the stage. The metric sums stay 0-dim tensors on the
policy's device (no host sync per micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config.schema import TrainConfig
from pipeline.logprobs.losses import LOSSES, PairLogps, combined_loss, rewards
from pipeline.logprobs.response import PairTokens


@dataclass
class PolicyLogps:
    """The policy's side of a micro-batch: chosen, rejected [B] float32 sequence log-probs, and
    the pair weights [B] (no gradient) multiplying each pair's loss, or None (WPO's: ``wpo_weights``)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class PairObjective:
    """The loss of B pairs under ``train`` (train.loss_type, loss_weights, beta, length_normalize,
    ld_alpha, use_weighting, rpo_alpha, the losses' options), scaled by ``scale``.

    ref_chosen, ref_rejected: the reference's [B] sequence log-probs (float64 from the cache, or any
    float dtype); chosen_tokens, rejected_tokens: the [B] response token counts. Called as
    ``head.LossPlan``'s loss_fn: the loss over a range of the pairs is the sum of its pairs' terms.
    """

    train: TrainConfig
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: list[int]
    rejected_tokens: list[int]
    scale: float = 1.0

    def __call__(self, pairs: range, values: torch.Tensor, lengths: list[int],
                 log_sum_sq: torch.Tensor | None = None):
        """(loss, metric sums) of the pairs ``pairs`` from their per-token log-probs ``values``
        (responses chosen, rejected, chosen, ... of ``lengths``) and, with train.use_weighting,
        their log sum_v p^2."""
        return self.loss(pairs, self.policy_logps(PairTokens(values, lengths, log_sum_sq)))

    def policy_logps(self, tokens: PairTokens) -> PolicyLogps:
        """The sums of ``tokens``, LD-DPO-weighted when train.ld_alpha is set, and WPO's pair
        weights when train.use_weighting."""
        train_cfg = self.train
        weights = None if train_cfg.ld_alpha is None else ld_weights(tokens.lengths, train_cfg.ld_alpha)
        chosen, rejected = tokens.sums(weights)
        return PolicyLogps(chosen.float(), rejected.float(), wpo_weights(tokens) if train_cfg.use_weighting else None)

    def loss(self, pairs: range, policy: PolicyLogps):
        """Loss of the pairs ``pairs`` (scaled by ``scale``) and the per-pair sums of its metrics
        (0-dim tensors on the policy's device).

        policy: their [B] float32 sequence log-probs under the policy, and the pair weights. The loss
        is sum_k train.loss_weights[k] x train.loss_type[k] (TRL's mixture), each loss getting the
        summed log-probs and the response token counts (length-normalized losses divide by them
        themselves).
        """
        train_cfg = self.train
        policy_chosen, policy_rejected = policy.chosen, policy.rejected
        device = policy_chosen.device
        ref_chosen, ref_rejected = (v[pairs.start : pairs.stop].to(device, torch.float32)
                                    for v in (self.ref_chosen, self.ref_rejected))
        names = train_cfg.loss_names()
        chosen_len = torch.tensor(self.chosen_tokens[pairs.start : pairs.stop], device=device, dtype=torch.float32)
        rejected_len = torch.tensor(self.rejected_tokens[pairs.start : pairs.stop], device=device, dtype=torch.float32)
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
        return per_pair.sum() * self.scale, _metric_sums(per_pair, policy, reward_chosen, reward_rejected)


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
