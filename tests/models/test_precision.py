"""train.precision and train.save_dtype: dtypes of weights, gradients, AdamW states and final/;
pure bf16 trains the demo; the step-0 check uses the half-precision tolerance in bf16 modes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from pipeline.config.load import config_from_dict
from pipeline.errors import ConfigError
from pipeline.models import precision
from pipeline.storage import paths
from pipeline.storage.paths import policy_init, run_identity
from pipeline.storage.trust import LOGPROB_TOLERANCE_HALF
from pipeline.train.stage import train

DEMO_TRAIN = {"learning_rate": 3e-3, "beta": 0.1, "per_device_train_batch_size": 16, "max_steps": 40,
              "warmup_steps": 5, "eval_steps": 0, "save_steps": 20}


@pytest.fixture
def demo_config(prepared_demo):
    return lambda **train_overrides: prepared_demo({**DEMO_TRAIN, **train_overrides})


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / paths.METRICS).read_text().splitlines()]


def saved_dtypes(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return {str(fh.get_slice(name).get_dtype()) for name in fh.keys()}


def test_precision_and_save_dtype_resolve():
    def cfg(dtype="float32", **train):
        return config_from_dict({"data": {"path": "x"}, "model": {"path": "m", "dtype": dtype}, "train": train})

    assert precision.resolve(cfg()) == "float32"
    assert precision.resolve(cfg("bfloat16")) == "bf16-mixed"  # as before the key existed
    assert precision.resolve(cfg("bfloat16", precision="float32")) == "float32"
    assert precision.save_dtype(cfg()) == "float32"
    assert precision.save_dtype(cfg("bfloat16")) == "float32"  # bf16-mixed: float32 master weights
    assert precision.save_dtype(cfg(precision="bf16")) == "bfloat16"
    assert precision.save_dtype(cfg(precision="bf16", save_dtype="float32")) == "float32"
    assert policy_init(cfg(precision="bf16")).dtype == "bfloat16"
    assert policy_init(cfg("bfloat16")).dtype == "float32"
    # The identity holds the resolved values, so a null that resolves the same is the same run.
    train_identity = run_identity(cfg("bfloat16"), "d", "c", {})["train"]
    assert (train_identity["precision"], train_identity["save_dtype"]) == ("bf16-mixed", "float32")
    assert run_identity(cfg("bfloat16"), "d", "c", {}) == run_identity(cfg("bfloat16", precision="bf16-mixed"), "d", "c", {})
    with pytest.raises(ConfigError, match="train.precision"):
        cfg(precision="fp8")
    with pytest.raises(ConfigError, match="train.save_dtype"):
        cfg(save_dtype="float16")


def test_pure_bf16_weights_gradients_and_adamw_states_are_bfloat16():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).to(torch.bfloat16)
    optimizer = precision.make_optimizer("bf16", model.parameters(), 1e-3, 0.0)
    model(input_ids=torch.arange(10)[None], labels=torch.arange(10)[None]).loss.backward()
    assert {p.grad.dtype for p in model.parameters()} == {torch.bfloat16}
    optimizer.step()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    states = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    assert len(states) == 2 * len(list(model.parameters())) and {v.dtype for v in states} == {torch.bfloat16}
    bytes_ = precision.state_bytes(model, optimizer)
    assert (bytes_["weights"] + bytes_["gradients"] + bytes_["optimizer"]) / bytes_["parameters"] == 8


def test_stochastic_rounding_is_unbiased_where_nearest_loses_the_update():
    """A weight of 1.0 plus an update of 1e-4: bfloat16 steps are 2**-7 = 0.0078 above 1, so
    rounding to nearest returns 1.0 every time; stochastic rounding is right on average."""
    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 1e-4)
    assert torch.equal(x.to(torch.bfloat16).float(), torch.ones_like(x))
    rounded = precision.stochastic_round(x).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 1e-4, abs=1e-5)
    special = precision.stochastic_round(torch.tensor([math.inf, -math.inf, 0.0, -2.5]))
    assert special.tolist() == [math.inf, -math.inf, 0.0, -2.5]


def test_pure_bf16_trains_the_demo_and_saves_bfloat16(demo_config):
    """Threshold as for float32 (test_train: > 0.75). Measured on the demo with DEMO_TRAIN (60 steps,
    24 eval pairs): eval reward accuracy float32 0.875, bf16-mixed 0.875, pure bf16 0.917."""
    cfg = demo_config(precision="bf16", run_name="bf16")
    result = train(cfg, show_progress=False)
    rows = metrics(result.run_dir)
    step0 = next(r for r in rows if "step0/tolerance" in r)
    assert step0["step0/tolerance"] == LOGPROB_TOLERANCE_HALF
    assert step0["step0/max_mean_token_diff"] < 0.05  # seen: 7e-4 (bf16 weights vs a float32 cache)
    first = next(r for r in rows if r["step"] == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=0.02)
    final = result.summary["final_eval"]
    assert final["eval/rewards/accuracies"] > 0.75  # chance is 0.5
    assert final["eval/loss"] < math.log(2) - 0.2
    assert result.summary["inputs"]["train"]["precision"] == "bf16"
    assert saved_dtypes(result.run_dir / "final") == {"BF16"}
    assert json.loads((result.run_dir / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    # The AdamW moments as checkpointed are bfloat16 too (8 bytes per parameter in all).
    optimizer = torch.load(result.run_dir / "checkpoints" / "step-000020" / "optimizer.pt", weights_only=True)
    moments = [v for s in optimizer["state"].values() for k, v in s.items() if k != "step"]
    assert moments and {v.dtype for v in moments} == {torch.bfloat16}


def test_bf16_mixed_uses_the_half_tolerance_and_save_dtype_is_followed(demo_config):
    cfg = demo_config(precision="bf16-mixed", save_dtype="bfloat16", max_steps=2, save_steps=0,
                      run_name="mixed")
    result = train(cfg, show_progress=False)
    step0 = next(r for r in metrics(result.run_dir) if "step0/tolerance" in r)
    assert step0["step0/tolerance"] == LOGPROB_TOLERANCE_HALF and step0["step0/max_mean_token_diff"] < 0.05
    assert saved_dtypes(result.run_dir / "final") == {"BF16"}
    assert result.summary["settings"]["precision"] == "bf16-mixed"
    plain = train(demo_config(max_steps=1, save_steps=0, run_name="plain"), show_progress=False)
    assert saved_dtypes(plain.run_dir / "final") == {"F32"}  # float32 trains and saves float32
    assert next(r for r in metrics(plain.run_dir) if "step0/tolerance" in r)["step0/tolerance"] == 1e-3
