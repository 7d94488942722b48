"""Our losses against TRL 1.16's own loss code, on the same random log-probs.

    PYTHONPATH=. .venv-bench/bin/python bench/trl_losses_check.py [--pairs 8] [--seed 0]

TRL computes its DPO losses inside ``DPOTrainer._compute_loss`` (model forward, reference, loss,
metrics in one method). This calls that very method, unbound, on a stand-in ``self`` (beta,
loss_types, loss_weights, label_smoothing, f_divergence_type, ..., an identity accelerator) and a
stand-in model whose output carries given per-token log-probs: so the loss lines TRL runs are
TRL's, fed the same per-token log-probs (and completion masks, i.e. token counts) as ours; TRL's
precomputed reference log-probs are passed as the cached ones. SimPO is ``CPOTrainer.cpo_loss``
(loss_type simpo) and ORPO's odds-ratio term is ``ORPOTrainer.odds_ratio_loss``, both on
length-normalized log-probs as those trainers compute them. dpop is not in TRL (n/a).

Prints max |ours - TRL| of the batch loss per loss name (float32, as training runs), for each
f_divergence_type where TRL allows one, for a label smoothing where the loss uses it, and for a
weighted mixture; and the max |diff| of the gradients w.r.t. the policy's per-token log-probs of
the response tokens.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import types

import torch

from pipeline.logprobs.losses import LOSSES, TRL_LOSS_TYPES, PairLogps, combined_loss, sft_loss

from _common import bench_parser

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer


class _Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _batch(pairs: int, seed: int):
    """Per-token policy and reference log-probs of [chosen; rejected], a completion mask with
    column 0 a prompt token (as TRL's), and random response lengths 1..12."""
    g = torch.Generator().manual_seed(seed)
    width = 14
    lengths = torch.randint(1, 13, (2 * pairs,), generator=g)
    mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        mask[row, 1 : 1 + n] = 1
    shift = mask[:, 1:].float()
    policy = -torch.rand(2 * pairs, width - 1, generator=g) * 3 * shift
    ref = (policy - 0.3 * torch.randn(2 * pairs, width - 1, generator=g)).clamp(max=-1e-3) * shift
    return mask, policy, ref


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison's inputs: the batch (completion mask, per-token policy and reference
    log-probs) and the loss settings."""

    mask: torch.Tensor
    policy: torch.Tensor
    ref: torch.Tensor
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_div: str = "reverse_kl"
    alpha: float = 0.5
    tau: float = 0.05


def trl_dpo(loss_types, weights, case: Case):
    mask = case.mask
    per_token = case.policy.clone().requires_grad_(True)
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type=case.f_div,
        f_alpha_divergence_coef=case.alpha, beta=case.beta, loss_types=list(loss_types),
        loss_weights=weights or [1.0] * len(loss_types), label_smoothing=case.label_smoothing,
        use_weighting=False, args=types.SimpleNamespace(discopop_tau=case.tau),
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    n = mask.size(0)
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                    mean_logits=torch.zeros_like(per_token),
                                    is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    ref = case.ref.sum(1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref[: n // 2], "ref_rejected_logps": ref[n // 2 :]}
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    (grad,) = torch.autograd.grad(loss, per_token)
    return loss.detach(), grad * mask[:, 1:]  # the response tokens' gradients (padding has none)


def ours(loss_types, weights, case: Case, gamma=0.5):
    mask = case.mask
    per_token = case.policy.clone().requires_grad_(True)
    n = mask.size(0) // 2
    logps, ref = per_token.sum(1), case.ref.sum(1)
    tokens = mask.sum(1).float()
    per_pair = combined_loss(loss_types, weights, PairLogps(logps[:n], logps[n:], ref[:n], ref[n:]), case.beta,
                             case.label_smoothing, chosen_tokens=tokens[:n], rejected_tokens=tokens[n:],
                             f_divergence_type=case.f_div, f_alpha_divergence_coef=case.alpha,
                             discopop_tau=case.tau, simpo_gamma=gamma)
    loss = per_pair.mean()
    (grad,) = torch.autograd.grad(loss, per_token)
    return loss.detach(), grad * mask[:, 1:]


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def compare_dpo_losses(base: Case) -> list[tuple]:
    """TRL's DPOTrainer loss types (each f_divergence_type TRL allows, a label smoothing where the
    loss uses one) and a weighted mixture: one row each."""
    rows = []

    def compare(label, loss_types, weights=None, ls=0.0, f_div="reverse_kl"):
        case = dataclasses.replace(base, label_smoothing=ls, f_div=f_div)
        a, ga = ours(loss_types, weights, case)
        b, gb = trl_dpo(loss_types, weights, case)
        rows.append((label, f_div, ls, a.item(), b.item(), abs(a - b).item(), (ga - gb).abs().max().item()))

    for name in TRL_LOSS_TYPES:
        smoothing = 1e-3 if name == "exo_pair" else 0.0
        compare(name, [name], ls=smoothing)
        if name in ("robust", "aot", "aot_unpaired"):
            compare(name, [name], ls=0.1)
        if LOSSES[name].f_divergence:
            for f_div in ("forward_kl", "js_divergence", "alpha_divergence"):
                compare(name, [name], ls=smoothing, f_div=f_div)
    compare("sigmoid+bco_pair+sft [0.8,0.2,1.0] (MPO)", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    return rows


def compare_simpo(base: Case, n: int) -> list[tuple]:
    """SimPO: CPOTrainer.cpo_loss on length-normalized log-probs (its average_log_prob=True)."""
    rows = []
    mask, policy, beta = base.mask, base.policy, base.beta
    tokens = mask.sum(1).float()
    for ls in (0.0, 0.1):
        per_token = policy.clone().requires_grad_(True)
        avg = per_token.sum(1) / tokens
        fake = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=beta, label_smoothing=ls,
                                     accelerator=_Accelerator())
        theirs = CPOTrainer.cpo_loss(fake, avg[:n], avg[n:])[0].mean()
        (gb,) = torch.autograd.grad(theirs, per_token)
        gb = gb * mask[:, 1:]
        a, ga = ours(["simpo"], None, dataclasses.replace(base, label_smoothing=ls, f_div="reverse_kl"))
        rows.append(("simpo (CPOTrainer)", "reverse_kl", ls, a.item(), theirs.item(), abs(a - theirs).item(),
                     (ga - gb).abs().max().item()))
    return rows


def compare_orpo(base: Case, n: int) -> tuple:
    """ORPO: odds-ratio term (ORPOTrainer.odds_ratio_loss; TRL's loss = nll - losses.mean()); our
    orpo minus our NLL term."""
    mask, policy, beta = base.mask, base.policy, base.beta
    tokens = mask.sum(1).float()
    per_token = policy.clone().requires_grad_(True)
    avg = per_token.sum(1) / tokens
    fake = types.SimpleNamespace(beta=beta, accelerator=_Accelerator())
    theirs = -ORPOTrainer.odds_ratio_loss(fake, avg[:n], avg[n:])[0].mean()
    (gb,) = torch.autograd.grad(theirs, per_token)
    gb = gb * mask[:, 1:]
    per_token = policy.clone().requires_grad_(True)
    logps = per_token.sum(1)
    kwargs = dict(chosen_tokens=tokens[:n], rejected_tokens=tokens[n:])
    mine = (LOSSES["orpo"].fn(PairLogps(logps[:n], logps[n:], logps[:n], logps[n:]), beta, **kwargs)
            - sft_loss(PairLogps(logps[:n], logps[n:], None, None), beta, **kwargs)).mean()
    (ga,) = torch.autograd.grad(mine, per_token)
    ga = ga * mask[:, 1:]
    return ("orpo odds-ratio term (ORPOTrainer)", "reverse_kl", 0.0, mine.item(), theirs.item(),
            abs(mine - theirs).item(), (ga - gb).abs().max().item())


def report(args: argparse.Namespace, beta: float, rows: list[tuple]) -> None:
    """The table, the worst differences, and exit "mismatch" past 1e-5."""
    print(f"TRL 1.16 vs ours: {args.pairs} pairs, float32, beta {beta}, seed {args.seed}")
    print("| loss | f_divergence_type | label_smoothing | ours | TRL | max abs diff loss | max abs diff grad |")
    print("|---|---|---|---|---|---|---|")
    for label, f_div, ls, a, b, d, g in rows:
        print(f"| {label} | {f_div} | {ls:g} | {a:.6f} | {b:.6f} | {d:.2e} | {g:.2e} |")
    print("| dpop | - | - | - | n/a (not in TRL 1.16) | - | - |")
    worst = max(r[5] for r in rows)
    print(f"worst loss diff {worst:.2e}; worst grad diff {max(r[6] for r in rows):.2e}")
    if not math.isfinite(worst) or worst > 1e-5 or max(r[6] for r in rows) > 1e-5:
        raise SystemExit("mismatch")


def main() -> None:
    args = parse_args()
    mask, policy, ref = _batch(args.pairs, args.seed)
    base = Case(mask, policy, ref, beta=0.1, alpha=0.5, tau=0.05)
    rows = compare_dpo_losses(base) + compare_simpo(base, args.pairs)
    rows.append(compare_orpo(base, args.pairs))
    report(args, base.beta, rows)


if __name__ == "__main__":
    main()
