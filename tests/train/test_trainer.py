"""The training step at GPU speed, checked on the CPU: micro-batches by tokens give the gradient of
fixed micro-batches; a step reads nothing from the device until its record is read; the
non-finite guard leaves the weights untouched without a per-step read; torch.compile trains like
eager and its recompiles are counted."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pipeline.config.load import config_from_dict
from pipeline.errors import TrainError
from pipeline.models.loading import load_causal_lm
from pipeline.train.batches import Split, auto_token_budget, batch_indices, token_micro_batches
from pipeline.train.distributed import World
from pipeline.train.stage import build_trainer

from tests.helpers import demo_train

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _split(n: int = 24, seed: int = 0) -> Split:
    """Pairs of very different lengths (2..80 tokens each part), random cached references."""
    rng = random.Random(seed)
    part = lambda: [rng.randrange(5, 200) for _ in range(rng.choice([2, 5, 40, 80]))]  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    ref = lambda: -torch.rand(n, generator=gen, dtype=torch.float64) * 40 - 5  # noqa: E731
    return Split([f"{i:04d}" for i in range(n)], [part() for _ in range(n)], [part() for _ in range(n)],
                 [part() for _ in range(n)], ref(), ref())


EMPTY = Split([], [], [], [], torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))


def _trainer(demo_assets, split: Split, **train):
    settings = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "learning_rate": 1e-2,
                "max_steps": 20, "logging_steps": 5, **train}
    cfg = config_from_dict({"data": {"path": "x.jsonl"}, "model": {"path": str(demo_assets["model"])},
                            "train": settings})
    torch.manual_seed(0)
    return build_trainer(cfg, {"train": split, "eval": EMPTY}, load_causal_lm(cfg.model).train())


def test_token_micro_batches_keep_the_budget_and_every_pair_once():
    tokens = [500, 30, 30, 200, 120, 80, 700, 10]
    groups = token_micro_batches(tokens, 256)
    assert sorted(i for g in groups for i in g) == list(range(len(tokens)))
    for group in groups:  # within the budget, but for a pair over it, which goes alone
        assert sum(tokens[i] for i in group) <= 256 or len(group) == 1
    assert [g for g in groups if len(g) == 1 and tokens[g[0]] > 256] == [[6], [0]]  # longest first
    more = token_micro_batches(tokens, 256, count=7)  # what another rank needs: halve the fullest
    assert len(more) == 7 and sorted(i for g in more for i in g) == list(range(len(tokens)))
    assert token_micro_batches(tokens, 10_000) == [[6, 0, 3, 4, 5, 1, 2, 7]]
    assert len(token_micro_batches([5, 5], 100, count=9)) == 2  # never more groups than pairs


def test_token_micro_batches_run_as_many_on_every_rank(demo_assets):
    """Every rank runs the largest count any rank needs (FSDP2's all-gathers are collective), and
    the ranks' pairs together are the step's pairs, each once."""
    trainer = _trainer(demo_assets, _split(), micro_batch_tokens=120, per_device_train_batch_size=2)
    index = list(range(12))
    plans = []
    for rank in (0, 1):
        trainer.world = World(rank=rank, size=2)
        plans.append(trainer.micro_batches(index))
    assert len(plans[0]) == len(plans[1]) > 3  # regrouped: not the 3 fixed micro-batches of 2 pairs
    assert sorted(i for plan in plans for group in plan for i in group) == index


SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_auto_budget_is_the_tokens_whose_activations_weigh_the_weights(checkpointing):
    """train.micro_batch_tokens auto on SmolLM2-135M's shape (the documented 512 and 5056): the
    smallest multiple of 64 tokens whose activations (per layer and token: 6 x hidden + 4 x
    intermediate values kept, or with checkpointing each layer's input plus one layer's) reach the
    parameter count, counted here from the shapes by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
    h, i, layers, vocab, kv = 576, 1536, 30, 49152, 3 * 64
    weights = vocab * h + layers * (h * h * 2 + 2 * h * kv + 3 * h * i + 2 * h) + h  # tied head
    per_token = layers * h + 6 * h + 4 * i if checkpointing else layers * (6 * h + 4 * i)
    budget = auto_token_budget(model, checkpointing)
    assert budget == (5056 if checkpointing else 512) and budget % 64 == 0
    assert (budget - 64) * per_token < weights <= budget * per_token
    assert auto_token_budget(torch.nn.Linear(4, 4), checkpointing) is None  # no layer sizes: fixed micro-batches
    small = LlamaConfig(**{**SMOLLM2, "vocab_size": 64, "num_hidden_layers": 1})  # the floor: 256 MiB of activations
    floor = auto_token_budget(LlamaForCausalLM(small), checkpointing)
    values = h + 6 * h + 4 * i if checkpointing else 6 * h + 4 * i
    assert (floor - 64) * values * 4 < 256 * 2**20 <= floor * values * 4


def test_auto_budget_is_the_default_said_and_caps_only(demo_assets, caplog):
    """With the defaults the trainer takes the model's budget and says it. auto regroups a step only
    where a fixed micro-batch of some rank exceeds the budget (a step that fits keeps its pairs, in
    their order); an explicit budget regroups every step (short pairs fill a pass)."""
    split = _split()
    with caplog.at_level("INFO", logger="dpo.train"):
        auto = _trainer(demo_assets, split)
    budget = auto_token_budget(auto.policy, False)
    assert auto.token_budget == budget and f"micro_batch_tokens auto -> {budget}" in caplog.text
    index = batch_indices(0, 12, len(split), 0)
    fixed = _trainer(demo_assets, split, micro_batch_tokens=None).micro_batches(index)
    assert [len(g) for g in fixed] == [4, 4, 4] and auto.micro_batches(index) == fixed  # the tiny model: all fit
    size = lambda i: len(split.prompts[i]) + len(split.chosens[i]) + len(split.rejecteds[i])  # noqa: E731
    largest = max(sum(map(size, g)) for g in fixed)
    auto.token_budget = largest  # every fixed micro-batch fits: kept
    assert auto.micro_batches(index) == fixed
    auto.token_budget = largest - 1  # one does not: the step is regrouped, every pair once, within the budget
    groups = auto.micro_batches(index)
    assert groups != fixed and sorted(i for g in groups for i in g) == sorted(index)
    assert all(len(g) == 1 or sum(map(size, g)) <= largest - 1 for g in groups)
    explicit = _trainer(demo_assets, split, micro_batch_tokens=largest)
    assert explicit.micro_batches(index) != fixed  # an explicit budget regroups even a step that fits
    index = batch_indices(0, 24, len(split), 0)  # two ranks: one whose micro-batches fit regroups if the other's do not
    worst = [max(sum(map(size, auto.micro_batch(index, a, r))) for a in range(3)) for r in (0, 1)]
    me = worst.index(min(worst))
    auto.world, auto.token_budget = World(rank=me, size=2), worst[me]
    assert worst[1 - me] > worst[me]
    mine = [auto.micro_batch(index, a) for a in range(3)]
    groups = auto.micro_batches(index)
    assert groups != mine and sorted(i for g in groups for i in g) == sorted(i for g in mine for i in g)


def _recording_gradients(trainer) -> list[list[torch.Tensor]]:
    """The gradients the optimizer sees at each step (recorded as it steps)."""
    seen, step = [], trainer.optimizer.step

    def recording(*args, **kwargs):
        seen.append([p.grad.detach().clone() for p in trainer.policy.parameters() if p.grad is not None])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording
    return seen


def test_micro_batches_by_tokens_give_the_same_steps(demo_assets):
    """train.micro_batch_tokens regroups the step's pairs, the gradient is still the mean over them:
    losses, gradient norms and every gradient of 4 steps equal the fixed micro-batches' to float32
    rounding, with micro-batches that really differ (more of them, of other sizes)."""
    split = _split()
    fixed = _trainer(demo_assets, split, micro_batch_tokens=None)
    budget = _trainer(demo_assets, split, micro_batch_tokens=150)
    index = batch_indices(0, 12, len(split), 0)
    assert sorted(map(len, budget.micro_batches(index))) != sorted(map(len, fixed.micro_batches(index)))
    grads = _recording_gradients(fixed), _recording_gradients(budget)
    for step in range(4):
        a, b = fixed.run_step(step), budget.run_step(step)
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (step, key)
    for step, (want, got) in enumerate(zip(*grads, strict=True)):
        for g, h in zip(want, got, strict=True):
            assert (g - h).norm() <= 1e-4 * g.norm() + 1e-7, step


class _NoRead:
    """Refuse reading a float or bool tensor's value on the host (what a sync is on a GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "numpy")

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def refuse(tensor, *args, _real=real, _name=name, **kwargs):
                if tensor.is_floating_point() or tensor.dtype == torch.bool:
                    raise AssertionError(f"train_step read a tensor's value ({_name}) inside the step")
                return _real(tensor, *args, **kwargs)

            self.monkeypatch.setattr(torch.Tensor, name, refuse)
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()


@pytest.mark.parametrize("train", [{}, {"micro_batch_tokens": 150, "use_weighting": True, "rpo_alpha": 0.5},
                                   {"precision": "bf16"}], ids=["plain", "tokens-wpo-rpo", "pure-bf16"])
def test_a_step_reads_nothing_until_its_record_is_read(demo_assets, monkeypatch, train):
    """Forward, loss, backward, clipping, the guard and the optimizer step (fused AdamW, or the
    bf16 one) without reading a value; then one read gives the same records as reading each step."""
    split = _split()
    quiet, eager = _trainer(demo_assets, split, **train), _trainer(demo_assets, split, **train)
    torch.manual_seed(1)  # pure bf16 rounds stochastically: the same random bits for both
    with _NoRead(monkeypatch):
        records = [quiet.train_step(step) for step in range(3)]
    assert all(isinstance(r["loss"], torch.Tensor) for r in records)
    read = quiet.read_records(records, 1.0)
    torch.manual_seed(1)
    for got, want in zip(read, [eager.run_step(step) for step in range(3)]):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6) and math.isfinite(got["grad_norm"])
        assert got["seconds"] == pytest.approx(1 / 3) and got["tokens/s"] > 0


def test_non_finite_step_leaves_the_weights_and_stops_at_the_next_read(demo_assets):
    """A NaN in step 2's references: steps 2 and 3 run (nothing is read) but change no weight and no
    optimizer state; the read names step 2 and its pairs."""
    split = _split()
    trainer = _trainer(demo_assets, split)
    bad = batch_indices(1, trainer.batch, len(split), 0)
    split.ref_chosen[bad[0]] = float("nan")
    trainer.run_step(0)
    weights = [p.detach().clone() for p in trainer.policy.parameters()]
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    records = [trainer.train_step(1), trainer.train_step(2)]
    assert all(torch.equal(p, w) for p, w in zip(trainer.policy.parameters(), weights))
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(trainer.optimizer.state.values(), moments))
    with pytest.raises(TrainError, match=rf"non-finite loss at step 2 \(batch ids {split.ids[bad[0]]}") as error:
        trainer.read_records(records)
    assert "were not updated" in str(error.value)


def test_compiled_training_equals_eager_over_20_steps(demo_assets):
    """train.torch_compile on the CPU: the losses of 20 steps (pairs of varied lengths: rows padded to
    multiples of 64, a few shapes) within 1e-4 of eager, with few graphs compiled."""
    from pipeline.models import compiling

    split = _split(40, seed=3)
    eager = _trainer(demo_assets, split, torch_compile=False, per_device_train_batch_size=2,
                     gradient_accumulation_steps=1)
    compiled = _trainer(demo_assets, split, torch_compile=True, per_device_train_batch_size=2,
                        gradient_accumulation_steps=1)
    assert compiled.compiled and compiled.pad_multiple == 64 and not eager.compiled
    before = compiling.graphs_compiled()
    for step in range(20):
        a, b = eager.run_step(step), compiled.run_step(step)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), step
    assert 1 <= compiling.graphs_compiled() - before <= 4


def test_compile_with_lora_and_gradient_checkpointing_logs_recompiles(scored_demo):  # noqa: F811
    """A real run compiled, with LoRA and gradient checkpointing: it trains (finite, the loss moves
    from ln 2), metrics.jsonl counts the graphs and the recompiles after the first step."""
    steps, _ = demo_train(scored_demo, "sigmoid", 4, torch_compile=True, gradient_checkpointing=True,
                          peft={"r": 4, "lora_alpha": 8}, learning_rate=5e-2, run_name="compiled-lora")
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(r["loss"]) for r in steps) and steps[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert all(r["compile/graphs"] >= 1 and 0 <= r["compile/recompiles"] <= 3 for r in steps)
