"""The fused LM head (pipeline/logprobs/head.py) against float64 autograd: per-token log-probs, WPO's
log sum p^2, and the gradients w.r.t. hidden states, LM-head weight and bias; through a model
(tied embeddings, LoRA, bf16 autocast) against the unfused path; and what it keeps for the backward."""

from __future__ import annotations

import pytest
import torch

from pipeline.logprobs import response as logprobs
from pipeline.logprobs.head import LinearHead, checkpointed_logps, fused_logps


def _float64_reference(hidden, weight, bias, targets, softcap, scale):
    """log p(target | h) and log sum_v p^2 from the whole float64 log-softmax, plain autograd."""
    logits = hidden @ weight.t() + (0 if bias is None else bias)
    logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logps = torch.log_softmax(logits, dim=-1)
    return logps.gather(-1, targets[:, None]).squeeze(-1), torch.logsumexp(2 * logps, dim=-1)


@pytest.mark.parametrize("bias, softcap, scale", [(False, None, 1.0), (True, None, 1.0), (False, 3.0, 1.0),
                                                  (True, 2.5, 0.7)])
def test_values_and_gradients_match_float64(bias, softcap, scale):
    """Every output and every gradient the loss can ask for, within float32 rounding, with chunks
    that do not divide the token count (5 tokens a chunk, 23 tokens)."""
    gen = torch.Generator().manual_seed(0)
    N, H, V = 23, 16, 97
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    b = torch.randn(V, generator=gen) if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen, dtype=torch.float64)  # d loss / d log p, any loss

    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    head = LinearHead(leaves[1], leaves[2] if bias else None, softcap, scale)
    values, squares = fused_logps(leaves[0], targets, head, log_sum_sq=True, chunk=5)
    (values.double() * upstream).sum().backward()

    exact = [t.double().clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    want, want_squares = _float64_reference(exact[0], exact[1], exact[2] if bias else None, targets, softcap, scale)
    (want * upstream).sum().backward()

    assert values.dtype == torch.float32 and not squares.requires_grad
    assert torch.allclose(values.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(squares.double(), want_squares.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in zip(leaves, exact):
        assert got.grad.dtype == got.dtype
        scale_of = ref.grad.abs().max()
        assert (got.grad.double() - ref.grad).abs().max() <= 1e-5 * scale_of, "gradient differs beyond rounding"


def test_only_the_hidden_states_may_need_a_gradient():
    """A frozen head (LoRA elsewhere): no weight gradient computed, the hidden states' still exact."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 8, generator=gen, requires_grad=True)
    weight = torch.randn(31, 8, generator=gen)
    targets = torch.randint(0, 31, (9,), generator=gen)
    fused_logps(hidden, targets, LinearHead(weight), chunk=4).sum().backward()
    exact = hidden.detach().double().requires_grad_()
    _float64_reference(exact, weight.double(), None, targets, None, 1.0)[0].sum().backward()
    assert torch.allclose(hidden.grad.double(), exact.grad, atol=1e-6)


def _saved_numels(fn) -> list[int]:
    """Sizes of the tensors autograd keeps for the backward while ``fn`` runs."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sizes


def test_fused_keeps_no_tokens_by_vocab_tensor_for_the_backward():
    """The fused head keeps h, the weight, the targets and one float per token; the unfused
    path keeps each chunk's [n x vocab] float32 log-softmax (what this removes)."""
    N, H, V = 40, 8, 500
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    fused = _saved_numels(lambda: fused_logps(hidden, targets, LinearHead(weight)))
    assert sorted(fused) == sorted([N * H, V * H, N, N])
    plain = _saved_numels(lambda: checkpointed_logps(hidden, targets, lambda h: h @ weight.t(), recompute=False))
    assert max(plain) >= N * V


def _tiny(demo_assets, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]), dtype=dtype)


PAIRS = ([[5, 6, 7], [20], [30, 31]], [[8, 9, 10, 11, 12], [21], [40, 41, 42]], [[13, 14], [22, 23, 24, 25], [50]])


def _grads(model, options):
    model.zero_grad(set_to_none=True)
    tokens = logprobs.pair_token_logps(model, *PAIRS, options)
    upstream = torch.linspace(-1, 2, tokens.values.shape[0])
    (tokens.values * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return tokens, grads


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.parametrize("lora_head", [False, True], ids=["tied-embeddings", "lora-on-lm-head"])
def test_through_a_model_fused_equals_plain_autograd(demo_assets, lora_head):
    """The demo model (LM head tied to the embedding: both gradients land on one weight), and with
    LoRA on the LM head (not a plain Linear: the checkpointed chunks): values, WPO's
    log sum p^2 and every parameter's gradient as the unfused path gives them."""
    model = _tiny(demo_assets)
    if lora_head:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
        assert not isinstance(logprobs.lm_head_of(model), LinearHead)
    else:
        assert isinstance(logprobs.lm_head_of(model), LinearHead)
    fused, fused_grads = _grads(model, logprobs.PairOptions(log_sum_sq=True))
    plain, plain_grads = _grads(model, logprobs.PairOptions(log_sum_sq=True, fused_head=False))
    assert torch.allclose(fused.values, plain.values, atol=1e-5)
    assert torch.allclose(fused.log_sum_sq, plain.log_sum_sq, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_bf16_autocast_matmuls_in_bf16_gradients_in_float32(demo_assets):
    """Under bf16-mixed autocast the head's matmuls run in bfloat16 as autocast would run them,
    the master weights' gradients stay float32 and agree with the unfused path to bf16 rounding."""
    model = _tiny(demo_assets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, fused_grads = _grads(model, logprobs.PairOptions())
        plain, plain_grads = _grads(model, logprobs.PairOptions(fused_head=False))
    assert fused.values.dtype == torch.float32
    assert torch.allclose(fused.values, plain.values, atol=2e-2)
    for name, grad in plain_grads.items():
        assert fused_grads[name].dtype == torch.float32
        assert (fused_grads[name] - grad).norm() <= 2e-2 * grad.norm() + 1e-6, name


def _pair_loss_fn(ref, beta=0.5):
    """A DPO loss with WPO-like weights (from log sum p^2, no gradient) over the pairs ``pairs``:
    per-pair terms summed, as every loss of the trainer."""

    def loss_fn(pairs, values, lengths, squares):
        bounds = torch.tensor([0, *lengths]).cumsum(0)
        sums = torch.stack([values[bounds[k]:bounds[k + 1]].sum() for k in range(len(lengths))])
        weight = torch.stack([torch.exp((values - squares)[bounds[k]:bounds[k + 1]].mean().detach())
                              for k in range(len(lengths))])
        margin = sums[0::2] - sums[1::2] - ref[pairs.start:pairs.stop].to(sums.dtype)
        per_pair = -torch.nn.functional.logsigmoid(beta * margin) * weight[0::2] * weight[1::2]
        return per_pair.sum(), {"loss": per_pair.detach().sum(), "chosen": sums[0::2].detach().sum()}

    return loss_fn


@pytest.mark.parametrize("softcap, scale", [(None, 1.0), (2.5, 0.7)])
def test_loss_inside_the_head_matches_float64(softcap, scale):
    """head_logps.fused_loss (gradients computed in the forward, chunk of pairs by chunk of pairs:
    chunks of 9 tokens over pairs of 3-11 tokens) against the whole loss in float64 autograd: the
    loss, its sums and the gradients w.r.t. hidden states, weight and bias."""
    from pipeline.logprobs.head import LossPlan, fused_loss, pair_chunks

    gen = torch.Generator().manual_seed(2)
    lengths = [3, 5, 7, 4, 2, 9, 6, 1]
    N, H, V = sum(lengths), 12, 53
    hidden = torch.randn(N, H, generator=gen)
    weight, bias = torch.randn(V, H, generator=gen) * 0.5, torch.randn(V, generator=gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    ref = torch.randn(4, generator=gen, dtype=torch.float64)
    assert len(pair_chunks(lengths, 9)) == 4  # whole pairs per chunk, one over the size alone

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    plan = LossPlan(_pair_loss_fn(ref), lengths, log_sum_sq=True, chunk=9)
    loss, sums = fused_loss(leaves[0], targets, LinearHead(leaves[1], leaves[2], softcap, scale), plan)
    (3 * loss).backward()

    exact = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    values, squares = _float64_reference(*exact, targets, softcap, scale)
    want, want_sums = _pair_loss_fn(ref)(range(4), values, lengths, squares)
    (3 * want).backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert sums["loss"].item() == pytest.approx(want_sums["loss"].item(), rel=1e-5)
    assert sums["chosen"].item() == pytest.approx(want_sums["chosen"].item(), rel=1e-5)
    for got, ref_leaf in zip(leaves, exact):
        assert (got.grad.double() - ref_leaf.grad).abs().max() <= 1e-5 * ref_leaf.grad.abs().max()


@pytest.mark.parametrize("train", [{}, {"use_weighting": True, "rpo_alpha": 0.5},
                                   {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5]},
                                   {"length_normalize": "both"}, {"precision": "bf16-mixed"}],
                         ids=["sigmoid", "wpo-rpo", "mixture", "normalized", "bf16-mixed"])
def test_trainer_loss_in_the_head_equals_plain_autograd(demo_assets, train):
    """Trainer.micro_loss with train.fused_lm_head (the loss inside the head) and without: the
    same loss, metric sums and gradient of every parameter, for each kind of loss input."""
    from pipeline.config.load import config_from_dict
    from pipeline.train.batches import Split
    from pipeline.train.stage import build_trainer

    prompts, chosens, rejecteds = (list(x) for x in PAIRS)
    ref = torch.tensor([-20.0, -3.0, -9.0], dtype=torch.float64)
    split = Split(["a", "b", "c"], prompts, chosens, rejecteds, ref, ref - 1)
    empty = Split([], [], [], [], ref[:0], ref[:0])
    results = []
    for fused in (True, False):
        cfg = config_from_dict({"data": {"path": "x"}, "model": {"path": str(demo_assets["model"])},
                                "train": {"fused_lm_head": fused, **train}})
        trainer = build_trainer(cfg, {"train": split, "eval": empty}, _tiny(demo_assets).train())
        loss, sums = trainer.micro_loss(split, [2, 0, 1], 0.25)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}
        results.append((loss.item(), {k: v.item() for k, v in sums.items()}, grads))
    (loss_f, sums_f, grads_f), (loss_p, sums_p, grads_p) = results
    tol = 2e-2 if train.get("precision") else 1e-5
    assert loss_f == pytest.approx(loss_p, rel=tol, abs=tol)
    assert sums_f.keys() == sums_p.keys() and all(sums_f[k] == pytest.approx(sums_p[k], rel=tol, abs=tol) for k in sums_f)
    assert grads_f.keys() == grads_p.keys() and grads_f
    for name, grad in grads_p.items():
        assert (grads_f[name] - grad).norm() <= tol * grad.norm() + 1e-7, name
