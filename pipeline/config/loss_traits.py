"""The losses' traits, one table (torch-free): pipeline/logprobs/losses.py builds LOSSES from it, the
configuration types train.loss_type with it and checks the loss options against it.

``LOSS_TRAITS[name]``: ``length_normalized`` (the loss divides by the token counts itself, as
TRL does: ipo, sigmoid_norm, simpo, orpo); ``reference_free`` (the reference log-probs are not
used: simpo, orpo; their rewards are beta x the length-normalized policy log-prob, as TRL's CPO /
ORPO trainers report); ``f_divergence`` (train.f_divergence_type may be other than reverse_kl,
TRL's set); ``learns_preferences`` (the loss pushes chosen above rejected: every loss but sft);
``trl`` (a TRL 1.16 DPOConfig.loss_type value; dpop, simpo and orpo are this project's additions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config.checks import check_range
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class LossTraits:
    length_normalized: bool = False
    reference_free: bool = False
    f_divergence: bool = False
    learns_preferences: bool = True
    trl: bool = True


LOSS_TRAITS: dict[str, LossTraits] = {
    "sigmoid": LossTraits(f_divergence=True),
    "hinge": LossTraits(f_divergence=True),
    "ipo": LossTraits(length_normalized=True, f_divergence=True),
    "exo_pair": LossTraits(f_divergence=True),
    "nca_pair": LossTraits(),
    "robust": LossTraits(f_divergence=True),
    "bco_pair": LossTraits(),
    "sppo_hard": LossTraits(),
    "aot": LossTraits(),
    "aot_unpaired": LossTraits(),
    "apo_zero": LossTraits(),
    "apo_down": LossTraits(),
    "discopop": LossTraits(f_divergence=True),
    "sft": LossTraits(f_divergence=True, learns_preferences=False),
    "sigmoid_norm": LossTraits(length_normalized=True, f_divergence=True),
    "dpop": LossTraits(trl=False),
    "simpo": LossTraits(length_normalized=True, reference_free=True, trl=False),
    "orpo": LossTraits(length_normalized=True, reference_free=True, trl=False),
}

LossType = Literal[tuple(LOSS_TRAITS)]  # type: ignore[valid-type]  # a Literal of the loss names
"""train.loss_type's choices: the names of LOSS_TRAITS, in its order."""

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""train.f_divergence_type's choices (TRL's set); reverse_kl is DPO."""

FDivergenceType = Literal[F_DIVERGENCES]  # type: ignore[valid-type]


def losses_with(trait: str) -> list[str]:
    """The names of the losses that have ``trait`` (an attribute of LossTraits), in table order."""
    return [name for name, traits in LOSS_TRAITS.items() if getattr(traits, trait)]


def check_loss_options(train: Any) -> None:
    """ConfigError unless the train section's losses (loss_type, loss_weights) and their options
    fit together and are in range; ``train`` is a pipeline.config.schema.TrainConfig."""
    names = train.loss_names()
    if not names:
        raise ConfigError("train.loss_type: name at least one loss, e.g. sigmoid")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.loss_type: {names} names a loss twice", hint="give each loss once, with its weight "
                          "in train.loss_weights")
    if train.loss_weights is not None and len(train.loss_weights) != len(names):
        raise ConfigError(
            f"train.loss_weights: {len(train.loss_weights)} weights for {len(names)} losses in train.loss_type "
            f"({', '.join(names)})", hint="give one weight per loss, in the same order, or null for 1.0 each"
        )
    if "exo_pair" in names and train.label_smoothing == 0.0:
        raise ConfigError("train.label_smoothing: exo_pair needs label smoothing above 0 (log eps); the EXO "
                          "paper uses 1e-3", hint="set train.label_smoothing=0.001")
    _check_f_divergence(train.f_divergence_type, names)
    check_range("train.discopop_tau", train.discopop_tau, 1e-12, None)
    check_range("train.dpop_lambda", train.dpop_lambda, 0.0, None)
    if train.use_weighting and {"aot", "aot_unpaired"} & set(names):
        raise ConfigError("train.use_weighting: WPO's per-pair weights are undefined for aot and aot_unpaired "
                          "(their loss is over the sorted batch, not per pair; TRL refuses too)", hint="drop one")
    if train.ld_alpha is not None:
        check_range("train.ld_alpha", train.ld_alpha, 0.0, None)
    if train.length_normalize is not None:
        already = [n for n in names if LOSS_TRAITS[n].length_normalized]
        if already:
            raise ConfigError(f"train.length_normalize: {', '.join(already)} already normalize by length: "
                              "drop train.length_normalize (or use sigmoid)")


def _check_f_divergence(f_divergence_type: str, names: list[str]) -> None:
    if f_divergence_type == "reverse_kl":
        return
    unsupported = [n for n in names if not LOSS_TRAITS[n].f_divergence]
    if unsupported:
        raise ConfigError(
            f"train.f_divergence_type: {f_divergence_type} has no valid form for "
            f"{', '.join(unsupported)} (only for {', '.join(losses_with('f_divergence'))}, as TRL)",
            hint="use reverse_kl",
        )
