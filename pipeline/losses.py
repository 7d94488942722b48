"""DPO-family losses: a small table of pure functions over the same four log-prob tensors.

Every loss takes per-pair sequence log-probs, shape [B] each:
    policy_chosen = log pi(y_w|x), policy_rejected = log pi(y_l|x),
    ref_chosen = log pi_ref(y_w|x), ref_rejected = log pi_ref(y_l|x),
plus beta and label_smoothing, and returns the per-pair loss, shape [B]. With
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
the implicit rewards are beta * (policy - ref) for each response.

``LOSSES[name].length_normalized`` says whether the trainer passes log-probs averaged over
response tokens instead of summed (IPO, as TRL does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def _h(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023), with conservative DPO (cDPO) label smoothing eps:

        L = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)

    eps = 0 is the seed's loss: -log sigma(beta * [(log pi(y_w) - log pi_ref(y_w)) -
    (log pi(y_l) - log pi_ref(y_l))]).
    """
    logits = beta * _h(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """IPO (Azar et al. 2023), on length-normalized log-probs (as TRL):

        L = (h - 1 / (2 * beta))^2
    """
    return (_h(policy_chosen, policy_rejected, ref_chosen, ref_rejected) - 1 / (2 * beta)) ** 2


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """SLiC-style hinge (Zhao et al. 2023):

        L = max(0, 1 - beta * h)
    """
    return torch.relu(1 - beta * _h(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def robust_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate eps < 1/2:

        L = [(1 - eps) * (-log sigma(beta * h)) - eps * (-log sigma(-beta * h))] / (1 - 2 * eps)
    """
    logits = beta * _h(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


@dataclass(frozen=True)
class Loss:
    fn: Callable[..., torch.Tensor]
    length_normalized: bool = False


LOSSES: dict[str, Loss] = {
    "sigmoid": Loss(sigmoid_loss),
    "ipo": Loss(ipo_loss, length_normalized=True),
    "hinge": Loss(hinge_loss),
    "robust": Loss(robust_loss),
}


def rewards(policy, ref, beta):
    """Implicit reward beta * (log pi - log pi_ref), per response."""
    return beta * (policy - ref)
