"""LD-DPO (train.ld_alpha) and WPO (train.use_weighting) against independent computations, and
their demo trainings."""

from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config.load import config_from_dict
from pipeline.errors import ConfigError
from pipeline.logprobs import response as logprobs
from pipeline.logprobs.objective import ld_weights, wpo_weights
from pipeline.train.batches import Split, ValueLists
from pipeline.train.loss import ld_reference

from tests.helpers import demo_train


def test_ld_weights_hand_computed():
    """Pairs (3, 5) and (2, 2) with alpha 0.25: the shared length is 3, then 2."""
    got = ld_weights([3, 5, 2, 2], 0.25).tolist()
    assert got == [1, 1, 1] + [1, 1, 1, 0.25, 0.25] + [1, 1] + [1, 1]


def test_ld_reference_is_the_weighted_float64_sum():
    rng = np.random.default_rng(0)
    chosen = [rng.normal(-2, 1, n).astype(np.float32) for n in (4, 1, 6)]
    rejected = [rng.normal(-2, 1, n).astype(np.float32) for n in (2, 3, 6)]
    split = Split(["a", "b", "c"], [[1]] * 3, [[1] * len(c) for c in chosen], [[1] * len(r) for r in rejected],
                  None, None, ValueLists(pa.array([c.tolist() for c in chosen], pa.list_(pa.float32()))),
                  ValueLists(pa.array([r.tolist() for r in rejected], pa.list_(pa.float32()))))
    got_c, got_r = ld_reference(split, [2, 0, 1], 0.5)
    for k, i in enumerate([2, 0, 1]):
        shared = min(len(chosen[i]), len(rejected[i]))
        want_c = sum(float(v) * (1.0 if j < shared else 0.5) for j, v in enumerate(chosen[i]))
        want_r = sum(float(v) * (1.0 if j < shared else 0.5) for j, v in enumerate(rejected[i]))
        assert got_c[k].item() == pytest.approx(want_c, abs=1e-12)
        assert got_r[k].item() == pytest.approx(want_r, abs=1e-12)
    assert got_c.dtype == torch.float64


def test_ld_alpha_one_is_dpo_and_ld_dpo_starts_at_ln2(scored_demo):  # noqa: F811
    plain, _ = demo_train(scored_demo, "sigmoid", 2, run_name="plain")
    one, _ = demo_train(scored_demo, "sigmoid", 2, ld_alpha=1.0, run_name="ld1")
    for a, b in zip(plain, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    ld, evals = demo_train(scored_demo, "sigmoid", 3, ld_alpha=0.3, run_name="ld03")
    # policy == reference at step 1, each side weighted alike: every reward is 0, the loss ln 2
    assert ld[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(r["loss"]) for r in ld) and math.isfinite(evals[-1]["eval/loss"])


def test_ld_policy_sums_weigh_the_tail(demo_assets):
    """The policy side of LD-DPO: sums of the per-token log-probs with the tail beyond the shared
    length weighted by alpha, against each sequence alone in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]), dtype=torch.float32).eval()
    model64 = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]), dtype=torch.float64).eval()
    pairs = [([5, 6, 7], [8, 9, 10, 11, 12], [13, 14]), ([20], [21], [22, 23, 24, 25])]
    with torch.no_grad():
        tokens = logprobs.pair_token_logps(model, *map(list, zip(*pairs)))
        chosen, rejected = tokens.sums(ld_weights(tokens.lengths, 0.3))

        def ld_sum(prompt, response, shared):
            logps = torch.log_softmax(model64(torch.tensor([prompt + response])).logits[0], -1)
            return sum(logps[len(prompt) + j - 1, t] * (1.0 if j < shared else 0.3) for j, t in enumerate(response))

        for k, (p, c, r) in enumerate(pairs):
            shared = min(len(c), len(r))
            assert chosen[k].item() == pytest.approx(ld_sum(p, c, shared).item(), abs=1e-4)
            assert rejected[k].item() == pytest.approx(ld_sum(p, r, shared).item(), abs=1e-4)
        plain_c, plain_r = tokens.sums()
        assert abs(plain_c[0] - chosen[0]) > 0.1 and abs(plain_r[1] - rejected[1]) > 0.1  # tails weigh less


def test_wpo_weights_match_an_independent_float64_computation(demo_assets):
    """w = exp(mean_t [log p(y_t) - log sum_v p(v)^2]) per response, w_chosen x w_rejected per pair,
    from each sequence's full float64 logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]), dtype=torch.float32).eval()
    model64 = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]), dtype=torch.float64).eval()
    rng = random.Random(1)
    pairs = [([rng.randrange(5, 200) for _ in range(rng.randint(1, 9))],
              [rng.randrange(5, 200) for _ in range(rng.randint(1, 7))],
              [rng.randrange(5, 200) for _ in range(rng.randint(1, 7))]) for _ in range(5)]
    with torch.no_grad():
        tokens = logprobs.pair_token_logps(model, *map(list, zip(*pairs)), logprobs.PairOptions(log_sum_sq=True))
        got = wpo_weights(tokens)

        def weight(prompt, response):
            logps = torch.log_softmax(model64(torch.tensor([prompt + response])).logits[0], -1)
            rows = logps[len(prompt) - 1 : len(prompt) + len(response) - 1]
            aligned = rows[torch.arange(len(response)), torch.tensor(response)] - torch.logsumexp(2 * rows, -1)
            return torch.exp(aligned.mean())

        want = torch.stack([weight(p, c) * weight(p, r) for p, c, r in pairs])
    assert torch.allclose(got.double(), want, rtol=1e-4)
    assert (want < 1).all() and want.std() > 0  # weights below 1 that differ: the check is not vacuous


def test_wpo_trains_and_weighs_the_first_loss_below_ln2(scored_demo):  # noqa: F811
    steps, evals = demo_train(scored_demo, "sigmoid", 3, use_weighting=True, run_name="wpo")
    # at the reference every pair's loss is ln 2 x w_chosen x w_rejected, with weights in (0, 1)
    assert 0 < steps[0]["loss"] < math.log(2) - 1e-3
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert math.isfinite(evals[-1]["eval/loss"])


def test_wpo_with_aot_and_negative_ld_alpha_are_refused():
    base = {"data": {"path": "x.jsonl"}, "model": {"path": "m"}}
    with pytest.raises(ConfigError, match="use_weighting"):
        config_from_dict({**base, "train": {"loss_type": "aot", "use_weighting": True}})
    with pytest.raises(ConfigError, match="ld_alpha"):
        config_from_dict({**base, "train": {"ld_alpha": -0.5}})


@pytest.mark.parametrize("side", ["chosen", "rejected", "both"])
def test_length_normalize_either_side_hand_computed(side):
    """sigmoid with train.length_normalize: -log sigma(beta (rho_w' - rho_l')), rho' the log-ratio
    divided by that response's token count on the normalized side(s), the sum elsewhere; both is
    sigmoid_norm."""
    from pipeline.logprobs.losses import PairLogps, sigmoid_norm_loss
    from pipeline.logprobs.objective import PolicyLogps
    from pipeline.train.loss import pair_objective

    cfg = config_from_dict({"data": {"path": "x.jsonl"}, "model": {"path": "m"},
                            "train": {"length_normalize": side, "beta": 0.5}})
    split = Split(["a", "b"], [[1], [1]], [[1] * 4, [1] * 2], [[1] * 3, [1] * 5],
                  torch.tensor([-8.0, -3.0], dtype=torch.float64), torch.tensor([-6.0, -9.0], dtype=torch.float64))
    pc, pr = torch.tensor([-6.0, -4.0]), torch.tensor([-7.5, -7.0])
    loss, sums = pair_objective(cfg, split, [0, 1], 1.0).loss(range(2), PolicyLogps(pc, pr))
    n_w, n_l = torch.tensor([4.0, 2.0]), torch.tensor([3.0, 5.0])
    rho_w, rho_l = pc.double() - torch.tensor([-8.0, -3.0]).double(), pr.double() - torch.tensor([-6.0, -9.0]).double()
    if side in ("chosen", "both"):
        rho_w = rho_w / n_w
    if side in ("rejected", "both"):
        rho_l = rho_l / n_l
    want = sum(math.log1p(math.exp(-0.5 * float(d))) for d in rho_w - rho_l)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert float(sums["logps/chosen"]) == pytest.approx(-10.0)  # metrics keep the sums, as TRL
    if side == "both":
        norm = sigmoid_norm_loss(PairLogps(pc, pr, torch.tensor([-8.0, -3.0]), torch.tensor([-6.0, -9.0])), 0.5,
                                 chosen_tokens=n_w, rejected_tokens=n_l)
        assert loss.item() == pytest.approx(norm.sum().item(), rel=1e-6)


def test_length_normalize_is_refused_with_length_normalized_losses():
    with pytest.raises(ConfigError, match="already normalize"):
        config_from_dict({"data": {"path": "x.jsonl"}, "model": {"path": "m"},
                          "train": {"loss_type": ["sigmoid", "simpo"], "length_normalize": "both"}})


def test_length_normalize_trains_the_demo(scored_demo):  # noqa: F811
    steps, evals = demo_train(scored_demo, "sigmoid", 3, length_normalize="chosen", run_name="lnc")
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(r["loss"]) for r in steps) and math.isfinite(evals[-1]["eval/loss"])
