"""Padding-free pair batches (logprobs.pack_pairs): the layout, the masks, and the same numbers as
padded batches and as each sequence alone in float64, in scoring and in training."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.logprobs import response as logprobs
from pipeline.logprobs.losses import PairLogps, sigmoid_loss

from tests.conftest import seed_formula_gradient


def random_pairs(n: int, seed: int = 0, vocab: int = 200):
    rng = random.Random(seed)

    def tokens(low, high):
        return [rng.randrange(5, vocab) for _ in range(rng.randint(low, high))]

    return [tokens(1, 30) for _ in range(n)], [tokens(1, 12) for _ in range(n)], [tokens(1, 12) for _ in range(n)]


def test_plan_rows_first_fit_decreasing():
    totals = [600, 300, 250, 200, 90, 10]
    rows = logprobs.plan_rows(totals, "fit")
    assert sorted(i for row in rows for i in row) == list(range(len(totals)))  # each pair once
    assert all(sum(totals[i] for i in row) <= max(totals) for row in rows)  # no row beyond the longest
    assert rows == [[0], [1, 2, 5], [3, 4]]  # longest first, each into the first row with room (10 fits row 2)
    assert logprobs.plan_rows(totals, "flat") == [list(range(6))]
    assert logprobs.plan_rows(totals, "none") == [[i] for i in range(6)]
    with pytest.raises(ValueError, match="packing"):
        logprobs.plan_rows(totals, "dense")


def test_pack_pairs_layout():
    """Two pairs in one row: positions restart per pair, padding only at the row's end, each
    response's predicting positions and targets, and the mask: no token sees the other pair, the
    rejected tokens do not see the chosen ones."""
    batch = logprobs.pack_pairs([[1, 2, 3], [9]], [[4, 5], [10, 11]], [[6], [12]], packing="flat")
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 9, 10, 11, 12]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 1]]
    assert batch.segments.tolist() == [[0, 0, 0, 1, 1, 2, 4, 5, 5, 6]]
    assert batch.lengths == [2, 1, 2, 1]  # pair order: chosen_0, rejected_0, chosen_1, rejected_1
    assert batch.cols.tolist() == [2, 3, 2, 6, 7, 6]
    assert batch.targets.tolist() == [4, 5, 6, 10, 11, 12]
    mask = logprobs.dense_mask(batch.segments)[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True] + [False] * 4  # 6: prompt, itself
    assert mask[9].tolist() == [False] * 6 + [True, False, False, True]  # 12: its prompt 9, itself
    assert mask[8].tolist() == [False] * 6 + [True, True, True, False]
    # fit: the longest pair alone, the two short ones share a row; padding only at the row's end
    batch = logprobs.pack_pairs([[1, 2, 3], [7], [8]], [[4, 5], [7], [8]], [[6], [7], [8]], packing="fit")
    assert batch.input_ids.shape == (2, 6)
    assert batch.segments.tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, 4, 5, 6]]
    batch = logprobs.pack_pairs([[1, 2, 3], [7]], [[4, 5], [7]], [[6], [7]], packing="fit")
    assert batch.segments.tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, -1, -1, -1]]
    pad = logprobs.dense_mask(batch.segments)[1, 0]
    assert pad[4].tolist() == [False] * 4 + [True, False]  # padding sees only itself


@pytest.fixture(scope="module")
def models(demo_assets):
    from transformers import AutoModelForCausalLM

    path = str(demo_assets["model"])
    load = lambda dtype, kernel: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        path, dtype=dtype, attn_implementation=kernel).eval()
    return {"sdpa": load(torch.float32, "sdpa"), "eager": load(torch.float32, "eager"),
            "float64": load(torch.float64, "eager")}


def alone_float64(model, prompt, response) -> torch.Tensor:
    """Per-token log-probs of one sequence on its own: full logits, float64."""
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0], -1)
    return torch.stack([logps[len(prompt) + j - 1, tok] for j, tok in enumerate(response)])


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_logprobs_equal_float64_and_padded(models, kernel):
    prompts, chosens, rejecteds = random_pairs(9)
    expected = torch.cat([alone_float64(models["float64"], p, r)
                          for p, c, rj in zip(prompts, chosens, rejecteds) for r in (c, rj)])
    got = {}
    with torch.no_grad():
        for packing in logprobs.PACKING:
            tokens = logprobs.pair_token_logps(models[kernel], prompts, chosens, rejecteds,
                                               logprobs.PairOptions(packing=packing))
            got[packing] = tokens.values
            assert tokens.lengths == [len(r) for c, rj in zip(chosens, rejecteds) for r in (c, rj)]
            assert (tokens.values.double() - expected).abs().max() < 2e-5, packing
    assert (got["fit"] - got["none"]).abs().max() < 5e-6
    assert (got["flat"] - got["none"]).abs().max() < 5e-6
    # not vacuous: the pairs really share rows, and pairs differ
    batch = logprobs.pack_pairs(prompts, chosens, rejecteds, packing="fit")
    assert batch.input_ids.shape[0] < len(prompts)
    assert expected.std() > 0.1


def test_unshared_pairs_come_back_in_pair_order(models):
    prompts, chosens, rejecteds = random_pairs(4, seed=3)
    with torch.no_grad():
        shared = logprobs.pair_token_logps(models["sdpa"], prompts, chosens, rejecteds)
        separate = logprobs.pair_token_logps(models["sdpa"], prompts, chosens, rejecteds,
                                             logprobs.PairOptions(shared=False))
    assert separate.lengths == shared.lengths
    assert (separate.values - shared.values).abs().max() < 5e-6


def test_packed_gradient_equals_padded_and_the_seed_formula(models, demo_assets):
    """The DPO gradient through packed rows equals the padded one and the seed's formula
    grad L = -beta/B sum sigma(r_l - r_w) (grad log pi(y_w) - grad log pi(y_l)) in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]), dtype=torch.float32)
    prompts, chosens, rejecteds = random_pairs(5, seed=7)
    ref_chosen = torch.tensor([-20.0, -30.0, -25.0, -10.0, -40.0], dtype=torch.float64)
    ref_rejected = torch.tensor([-15.0, -6.0, -35.0, -12.0, -41.0], dtype=torch.float64)
    beta = 0.5
    grads = {}
    for packing in ("none", "fit", "flat"):
        model.zero_grad()
        chosen, rejected = logprobs.pair_token_logps(model, prompts, chosens, rejecteds,
                                                     logprobs.PairOptions(packing=packing)).sums()
        sigmoid_loss(PairLogps(chosen.double(), rejected.double(), ref_chosen, ref_rejected), beta).mean().backward()
        grads[packing] = {n: p.grad.double().clone() for n, p in model.named_parameters()}

    expected = seed_formula_gradient(demo_assets["model"], list(zip(prompts, chosens, rejecteds)), ref_chosen,
                                     ref_rejected, beta)
    for packing, grad in grads.items():
        for name, value in grad.items():
            assert torch.allclose(value, expected[name], rtol=1e-3, atol=1e-6), (packing, name)
    assert max(g.abs().max() for g in expected.values()) > 1e-3


def test_flex_block_mask_is_the_dense_mask():
    """The FlexAttention BlockMask admits exactly the dense mask's pairs (query, key)."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    batch = logprobs.pack_pairs(*random_pairs(6, seed=5), packing="fit")
    block = logprobs.flex_block_mask(batch.segments)
    dense = logprobs.dense_mask(batch.segments)[:, 0]
    B, T = batch.segments.shape
    q, kv = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    for b in range(B):
        admitted = block.mask_mod(torch.tensor(b), torch.tensor(0), q, kv)
        assert torch.equal(admitted, dense[b])
    assert isinstance(block, flex.BlockMask)



def test_training_steps_equal_with_and_without_padding_free(demo_assets):
    """train.padding_free changes the layout, not the step: train_step on pairs of varied lengths
    (so micro-batches really share rows) gives the same losses, gradient norms and rewards at every
    step, the loss the mean over the effective batch (2 micro-batches of 6 pairs), to float32
    rounding; and the key stays out of the run's identity."""
    from pipeline.config.load import config_from_dict
    from pipeline.models.loading import load_causal_lm
    from pipeline.storage import paths
    from pipeline.train.batches import Split, batch_indices
    from pipeline.train.stage import build_trainer

    long, short = random_pairs(12, seed=11), random_pairs(12, seed=12)
    cut = lambda lists, n: [x[:n] for x in lists]  # noqa: E731  short pairs: up to 4 + 3 + 3 tokens
    prompts = [x for pair in zip(long[0], cut(short[0], 4)) for x in pair]
    chosens = [x for pair in zip(long[1], cut(short[1], 3)) for x in pair]
    rejecteds = [x for pair in zip(long[2], cut(short[2], 3)) for x in pair]
    rng = torch.Generator().manual_seed(0)
    ref_c = -torch.rand(24, generator=rng, dtype=torch.float64) * 40 - 5
    ref_r = -torch.rand(24, generator=rng, dtype=torch.float64) * 40 - 5
    split = Split([str(i) for i in range(24)], prompts, chosens, rejecteds, ref_c, ref_r)
    empty = Split([], [], [], [], ref_c[:0], ref_r[:0])

    def run(padding_free: bool):
        cfg = config_from_dict({"data": {"path": "x.jsonl"}, "model": {"path": str(demo_assets["model"])},
                                "train": {"padding_free": padding_free, "per_device_train_batch_size": 6,
                                          "gradient_accumulation_steps": 2, "learning_rate": 1e-2,
                                          "max_steps": 3}})
        torch.manual_seed(0)
        trainer = build_trainer(cfg, {"train": split, "eval": empty}, load_causal_lm(cfg.model).train())
        return cfg, trainer.read_records([trainer.train_step(step) for step in range(3)])

    cfg, packed = run(True)
    _, padded = run(False)
    for a, b in zip(packed, padded):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert packed[-1]["loss"] != pytest.approx(packed[0]["loss"], abs=1e-3)  # the weights moved
    first = batch_indices(0, 12, 24, cfg.train.seed)[:6]  # micro-batches really share rows
    totals = [len(prompts[i]) + len(chosens[i]) + len(rejecteds[i]) for i in first]
    assert len(logprobs.plan_rows(totals, "fit")) < len(first)
    other = config_from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "padding_free": False}})
    assert paths.run_identity(cfg, "d", "c", {}) == paths.run_identity(other, "d", "c", {})
