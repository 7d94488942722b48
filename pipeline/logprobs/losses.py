"""DPO-family losses: a small table of pure functions over the same four log-prob tensors.

Every loss takes per-pair sequence log-probs (sums over the response tokens), shape [B] each, as
one ``PairLogps``:
    policy_chosen = log pi(y_w|x), policy_rejected = log pi(y_l|x),
    ref_chosen = log pi_ref(y_w|x), ref_rejected = log pi_ref(y_l|x),
plus beta and label_smoothing, and keyword options (the ones a loss needs; the others are ignored):
    chosen_tokens, rejected_tokens   [B] response token counts |y_w|, |y_l| (length-normalized losses, sft)
    f_divergence_type, f_alpha_divergence_coef, discopop_tau, dpop_lambda, simpo_gamma
and returns the per-pair loss, shape [B]; the trainer takes its mean. Names, formulas and
defaults are TRL 1.16's (``DPOTrainer._compute_loss``; SimPO from ``CPOTrainer.cpo_loss``, ORPO
from ``ORPOTrainer.odds_ratio_loss``); bench/trl_losses_check.py compares the numbers. With

    rho_w = log pi(y_w) - log pi_ref(y_w),  rho_l = log pi(y_l) - log pi_ref(y_l)   (log-ratios)
    s_w = f'(rho_w), s_l = f'(rho_l)         (scores: s = rho for the default reverse KL, see scores())
    Delta = s_w - s_l                        (h = rho_w - rho_l for the reverse KL)
    r_w = beta * rho_w, r_l = beta * rho_l   (implicit rewards, what the metrics report)

``LOSSES[name]``: ``fn`` and the loss's traits (``length_normalized``, ``reference_free``,
``f_divergence``, ``learns_preferences``, ``trl``), from the one table of them,
pipeline/config/loss_traits.py's LOSS_TRAITS (torch-free: the configuration checks read it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from pipeline.config.loss_traits import F_DIVERGENCES, LOSS_TRAITS, LossTraits


class PairLogps(NamedTuple):
    """The four per-pair sequence log-probs a loss reads, shape [B] each (the reference-free losses
    take None for the reference's)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: Optional[torch.Tensor]
    ref_rejected: Optional[torch.Tensor]

    def log_ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """rho_w = log pi(y_w) - log pi_ref(y_w), rho_l = log pi(y_l) - log pi_ref(y_l)."""
        return self.policy_chosen - self.ref_chosen, self.policy_rejected - self.ref_rejected

    def implicit_rewards(self, beta) -> tuple[torch.Tensor, torch.Tensor]:
        """r_w = beta * rho_w, r_l = beta * rho_l."""
        rho_w, rho_l = self.log_ratios()
        return beta * rho_w, beta * rho_l


def _h(logps):
    rho_w, rho_l = logps.log_ratios()
    return rho_w - rho_l


def scores(rho, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """f-DPO (Wang et al. 2023, "Beyond Reverse KL"): the log-ratio rho = log(t), t = pi / pi_ref,
    goes through f'(t) of the chosen f-divergence (TRL's f_divergence_type):

        reverse_kl        s = rho                                  (DPO)
        forward_kl        s = 1 - exp(-rho)                        f'(t) = 1 - 1/t
        js_divergence     s = log 2 + log sigma(rho)               f'(t) = log(2t / (t + 1))
        alpha_divergence  s = (exp((a - 1) * rho) - 1) / (a - 1)   f'(t) = (t^(a-1) - 1) / (a - 1),
                          a = f_alpha_divergence_coef; a = 1 is the reverse KL; the exponent is
                          clamped at 80 (as TRL, so exp stays finite in float32).
    All four are 0 at rho = 0.
    """
    if f_divergence_type == "reverse_kl":
        return rho
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-rho)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(rho)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return rho
        return (torch.exp(torch.clamp((a - 1.0) * rho, max=80.0)) - 1.0) / (a - 1.0)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}: one of {', '.join(F_DIVERGENCES)}")


def _delta(logps, o, normalized=False):
    rho_w, rho_l = logps.log_ratios()
    s_w = scores(rho_w, o.get("f_divergence_type", "reverse_kl"), o.get("f_alpha_divergence_coef", 0.5))
    s_l = scores(rho_l, o.get("f_divergence_type", "reverse_kl"), o.get("f_alpha_divergence_coef", 0.5))
    if normalized:
        s_w, s_l = s_w / _count(o, "chosen_tokens"), s_l / _count(o, "rejected_tokens")
    return s_w - s_l


def _count(o, key):
    if o.get(key) is None:
        raise ValueError(f"this loss is length-normalized: pass {key} (response token counts)")
    return o[key].clamp(min=1.0)


def _smoothed(logits, label_smoothing):
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


# --- losses on the reward difference (f-divergence capable) ---------------------------------------


def sigmoid_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290), with conservative DPO (cDPO) label smoothing eps:

        L = -(1 - eps) * log sigma(beta * Delta) - eps * log sigma(-beta * Delta)

    eps = 0 is the seed's loss and TRL's sigmoid: -log sigma(beta * [(log pi(y_w) - log pi_ref(y_w)) -
    (log pi(y_l) - log pi_ref(y_l))]); TRL 1.16 ignores label_smoothing here, this project keeps cDPO.
    """
    logits = beta * _delta(logps, o)
    return _smoothed(logits, label_smoothing)


def ipo_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17), on per-token scores (as TRL):

        L = (s_w / |y_w| - s_l / |y_l| - 1 / (2 * beta))^2

    Without token counts the inputs are taken as already length-normalized.
    """
    normalized = o.get("chosen_tokens") is not None
    delta = _delta(logps, o, normalized=normalized)
    return (delta - 1 / (2 * beta)) ** 2


def hinge_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """SLiC-style hinge (Zhao et al. 2023, arXiv:2305.10425):

        L = max(0, 1 - beta * Delta)
    """
    return torch.relu(1 - beta * _delta(logps, o))


def robust_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label-flip rate eps < 1/2:

        L = [(1 - eps) * (-log sigma(beta * Delta)) - eps * (-log sigma(-beta * Delta))] / (1 - 2 * eps)
    """
    logits = beta * _delta(logps, o)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def exo_pair_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, Eq. 16): KL(q || p) over {y_w, y_l}, with
    q = softmax of beta x scores = (sigma(beta * Delta), sigma(-beta * Delta)) and the smoothed
    labels p = (1 - eps, eps) (eps = label_smoothing > 0, the paper uses 1e-3):

        L = q_w * (log q_w - log(1 - eps)) + q_l * (log q_l - log eps)
    """
    logits = beta * _delta(logps, o)
    eps = torch.tensor(label_smoothing, dtype=logits.dtype, device=logits.device)
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps)))


def discopop_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """DiscoPOP, log-ratio modulated loss (Chan Lu et al. 2024, arXiv:2406.08414, Eq. 5); with
    z = beta * Delta and tau = discopop_tau (0.05):

        m = sigma(z / tau),  L = (1 - m) * (-log sigma(z)) + m * exp(-z)

    Not convex (the paper says so): with tau 0.05, dL/dz at z = 0 is 5 - 5 ln 2 - 3/4 = +0.78,
    so a policy starting at the reference (z = 0) descends to the local minimum at z = -0.12
    (rejected slightly above chosen); the descent towards large z starts beyond the local maximum
    at z = +0.07.
    """
    logits = beta * _delta(logps, o)
    modulation = torch.sigmoid(logits / o.get("discopop_tau", 0.05))
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def sigmoid_norm_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """DPO on per-token scores (TRL's sigmoid_norm; the length normalization of SimPO/LN-DPO,
    Meng et al. 2024, arXiv:2405.14734, with the reference kept):

        L = -log sigma(beta * (s_w / |y_w| - s_l / |y_l|))
    """
    delta = _delta(logps, o, normalized=True)
    return -F.logsigmoid(beta * delta)


def sft_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """SFT: NLL of the chosen responses, the mean over every chosen token of the batch (TRL's sft,
    the SFT term of an MPO mixture, Wang et al. 2024, arXiv:2411.10442):

        L = -sum_i log pi(y_w,i) / sum_i |y_w,i|,   the same value for every pair of the batch

    (each pair gets -log pi(y_w,i) * B / sum_j |y_w,j|, so the batch mean is exactly that).
    """
    tokens = _count(o, "chosen_tokens")
    return -logps.policy_chosen * logps.policy_chosen.numel() / tokens.sum()


# --- losses on each log-ratio (reverse KL only) ---------------------------------------------------


def nca_pair_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment", arXiv:2402.05369):

        L = -log sigma(r_w) - 0.5 * log sigma(-r_w) - 0.5 * log sigma(-r_l)
    """
    r_w, r_l = logps.implicit_rewards(beta)
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def bco_pair_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """BCO, pairwise (Jung et al. 2024, arXiv:2404.04656), as TRL 1.16 (no running reward mean):

        L = -log sigma(r_w) - log sigma(-r_l)
    """
    r_w, r_l = logps.implicit_rewards(beta)
    return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)


def sppo_hard_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P = 1 for y_w, 0 for y_l):

        L = (rho_w - 1 / (2 * beta))^2 + (rho_l + 1 / (2 * beta))^2
    """
    rho_w, rho_l = logps.log_ratios()
    return (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2


def aot_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal
    Transport", arXiv:2406.05882): the batch's sorted policy margins against the sorted reference
    margins (a batch-level loss: each entry is one rank, not one pair):

        d = sort(log pi(y_w) - log pi(y_l)) - sort(log pi_ref(y_w) - log pi_ref(y_l))
        L = -(1 - eps) * log sigma(beta * d) - eps * log sigma(-beta * d)
    """
    d = (torch.sort(logps.policy_chosen - logps.policy_rejected, dim=0)[0]
         - torch.sort(logps.ref_chosen - logps.ref_rejected, dim=0)[0])
    return _smoothed(beta * d, label_smoothing)


def aot_unpaired_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): sorted chosen log-ratios against sorted
    rejected log-ratios of the batch:

        d = sort(rho_w) - sort(rho_l),  L = -(1 - eps) * log sigma(beta * d) - eps * log sigma(-beta * d)
    """
    rho_w, rho_l = logps.log_ratios()
    d = torch.sort(rho_w, dim=0)[0] - torch.sort(rho_l, dim=0)[0]
    return _smoothed(beta * d, label_smoothing)


def apo_zero_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv:2408.06266,
    Eq. 7): chosen up, rejected down (chosen outputs better than the model's):

        L = 1 - sigma(r_w) + sigma(r_l)
    """
    r_w, r_l = logps.implicit_rewards(beta)
    return 1 - torch.sigmoid(r_w) + torch.sigmoid(r_l)


def apo_down_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8): both down, rejected more
    (chosen outputs worse than the model's):

        L = sigma(r_w) + 1 - sigma(r_w - r_l)
    """
    r_w, r_l = logps.implicit_rewards(beta)
    return torch.sigmoid(r_w) + 1 - torch.sigmoid(r_w - r_l)


def dpop_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv:2402.13228, Eq. 3): DPO with a penalty when
    the chosen log-prob falls below the reference's (lambda = dpop_lambda, the paper's 50; not in
    TRL 1.16):

        L = -log sigma(beta * (h - lambda * max(0, log pi_ref(y_w) - log pi(y_w))))
    """
    penalty = torch.relu(logps.ref_chosen - logps.policy_chosen)
    h = _h(logps)
    return -F.logsigmoid(beta * (h - o.get("dpop_lambda", 50.0) * penalty))


# --- reference-free --------------------------------------------------------------------------------


def simpo_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6), reference-free, on per-token log-probs
    (TRL's CPOTrainer, loss_type simpo); gamma = simpo_gamma (0.5), label smoothing eps:

        z = beta * (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma
        L = -(1 - eps) * log sigma(z) - eps * log sigma(-z)
    """
    a_w = logps.policy_chosen / _count(o, "chosen_tokens")
    a_l = logps.policy_rejected / _count(o, "rejected_tokens")
    gamma = o.get("simpo_gamma", 0.5)
    return _smoothed(beta * (a_w - a_l - gamma / beta), label_smoothing)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, branching at -ln 2 (as TRL's ORPO)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(logps: PairLogps, beta, label_smoothing=0.0, **o):
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7), reference-free: the NLL of the chosen
    response plus beta x the odds-ratio term, on per-token log-probs a = log pi(y) / |y|:

        log odds(y) = a - log(1 - exp(a))
        L = NLL - beta * log sigma(log odds(y_w) - log odds(y_l))
        NLL = -sum_i log pi(y_w,i) / sum_i |y_w,i|   (the sft term: mean over the chosen tokens of the batch)

    TRL's ORPOTrainer takes the NLL over the prompt tokens too; the cache has the response only.
    """
    a_w = logps.policy_chosen / _count(o, "chosen_tokens")
    a_l = logps.policy_rejected / _count(o, "rejected_tokens")
    log_odds = (a_w - a_l) - (_log1mexp(a_w) - _log1mexp(a_l))
    nll = sft_loss(logps, beta, **o)
    return nll - beta * F.logsigmoid(log_odds)


@dataclass(frozen=True)
class Loss(LossTraits):
    """A loss of the table: its function and its traits (LOSS_TRAITS)."""

    fn: Callable[..., torch.Tensor] = field(kw_only=True)


FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss, "hinge": hinge_loss, "ipo": ipo_loss, "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss, "robust": robust_loss, "bco_pair": bco_pair_loss, "sppo_hard": sppo_hard_loss,
    "aot": aot_loss, "aot_unpaired": aot_unpaired_loss, "apo_zero": apo_zero_loss, "apo_down": apo_down_loss,
    "discopop": discopop_loss, "sft": sft_loss, "sigmoid_norm": sigmoid_norm_loss, "dpop": dpop_loss,
    "simpo": simpo_loss, "orpo": orpo_loss,
}
"""Each loss's function, by its name in LOSS_TRAITS (the same names: LOSSES is built from both)."""

LOSSES: dict[str, Loss] = {name: Loss(fn=FUNCTIONS[name], **dataclasses.asdict(traits))
                           for name, traits in LOSS_TRAITS.items()}

TRL_LOSS_TYPES = tuple(name for name, traits in LOSS_TRAITS.items() if traits.trl)
"""TRL 1.16 DPOConfig.loss_type values; dpop, simpo and orpo are this project's additions."""


def combined_loss(names, weights, logps: PairLogps, beta, label_smoothing=0.0, **options):
    """sum_k weight_k x loss_k per pair (TRL: loss += per_sequence_loss.mean() * weight); weights
    null: 1 each. One name or a list."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} weights for {len(names)} loss types")
    total = 0.0
    for name, weight in zip(names, weights):
        total = total + weight * LOSSES[name].fn(logps, beta, label_smoothing, **options)
    return total


def rewards(policy, ref, beta):
    """Implicit reward beta * (log pi - log pi_ref), per response."""
    return beta * (policy - ref)
