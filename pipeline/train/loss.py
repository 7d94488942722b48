"""The train stage's side of the loss: what a micro-batch's objective reads besides the policy
(the reference's log-probs, the cache's or LD-DPO's weighted sums of its per-token values, and the
responses' token counts), and the metric sums, added up over micro-batches and read at once.

    objective = pair_objective(cfg, split, index, scale, reference=cached_reference)
    loss, sums = trainer.micro_loss(split, index, scale)     # the objective computed by logprobs
    totals = add_sums(totals, sums); read_sums(totals)       # float64 on the device, one transfer

The loss itself is the logprobs layer's (pipeline/logprobs/objective.py: TRL's losses with LD-DPO's
and WPO's weighting and the RPO term), so the fused LM head computes it without calling back up
into the stage. The metric sums stay 0-dim tensors on the policy's device (no host sync per
micro-batch): the caller adds them up (``add_sums``, in float64) and reads them together
(``read_sums``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pipeline.config.schema import Config
from pipeline.errors import TrainError
from pipeline.logprobs.objective import PairObjective, ld_weights
from pipeline.train.batches import Split


def cached_reference(split: Split, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of the pairs ``index`` from the cache: [B] float64 each. A split without
    reference (a reference-free run) gives NaN: the reference-free losses and their rewards never
    read it, and anything that did would stop the run as non-finite."""
    if split.ref_chosen is None or split.ref_rejected is None:
        missing = torch.full((len(index),), float("nan"), dtype=torch.float64)
        return missing, missing.clone()
    return split.ref_chosen[index], split.ref_rejected[index]


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


def pair_objective(cfg: Config, split: Split, index: list[int], scale: float = 1.0,
                   reference: Callable = cached_reference) -> PairObjective:
    """The objective of the pairs ``index`` of ``split`` (their loss scaled by ``scale``): the
    reference's log-probs (``reference(split, index)``) and the response token counts, read once
    for the micro-batch; the logprobs layer computes the loss from them and the policy's log-probs."""
    ref_chosen, ref_rejected = reference(split, index)
    return PairObjective(cfg.train, ref_chosen, ref_rejected, [len(split.chosens[i]) for i in index],
                         [len(split.rejecteds[i]) for i in index], scale)


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
