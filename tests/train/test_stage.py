"""The train stage: losses, the seed's gradient, learning, resume, the cache contract."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config.load import config_from_dict
from pipeline.errors import CacheError, TrainError
from pipeline.logprobs.losses import (
    LOSSES,
    PairLogps,
    hinge_loss,
    ipo_loss,
    rewards,
    robust_loss,
    sigmoid_loss,
)
from pipeline.logprobs.response import PairOptions, pair_logps
from pipeline.prepare.stage import prepare
from pipeline.score.stage import score
from pipeline.storage import paths
from pipeline.train.stage import train

from tests.conftest import crash_training_at, seed_formula_gradient

DEMO_TRAIN = {"learning_rate": 3e-3, "beta": 0.1, "per_device_train_batch_size": 16, "max_steps": 40, "warmup_steps": 5,
              "eval_steps": 20, "save_steps": 0}


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# --- losses --------------------------------------------------------------------------------------


def test_losses_hand_computed():
    """One pair: policy_chosen -1, policy_rejected -2, ref_chosen -1.5, ref_rejected -1.5.

    h = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1.
    sigmoid, beta 0.5: -log sigma(0.5) = log(1 + e^-0.5) = 0.474077...
    cDPO eps 0.1: 0.9 * 0.474077 + 0.1 * -log sigma(-0.5) = 0.9 * 0.474077 + 0.1 * 0.974077
        = 0.524077
    ipo, beta 0.25: (1 - 1 / 0.5)^2 = 1
    hinge, beta 0.5: max(0, 1 - 0.5) = 0.5
    robust, beta 0.5, eps 0.1: (0.9 * 0.474077 - 0.1 * 0.974077) / 0.8 = 0.411577
    """
    args = PairLogps(t(-1.0), t(-2.0), t(-1.5), t(-1.5))
    a, b = math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))
    assert sigmoid_loss(args, 0.5).item() == pytest.approx(a, abs=1e-12)
    assert a == pytest.approx(0.474077, abs=1e-6)
    assert sigmoid_loss(args, 0.5, 0.1).item() == pytest.approx(0.9 * a + 0.1 * b, abs=1e-12)
    assert ipo_loss(args, 0.25).item() == pytest.approx(1.0, abs=1e-12)
    assert hinge_loss(args, 0.5).item() == pytest.approx(0.5, abs=1e-12)
    assert robust_loss(args, 0.5, 0.1).item() == pytest.approx((0.9 * a - 0.1 * b) / 0.8, abs=1e-12)
    assert robust_loss(args, 0.5, 0.0).item() == pytest.approx(a, abs=1e-12)  # eps 0 is DPO


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    logps = t(-3.0, -7.5, -0.2)
    others = t(-4.0, -1.0, -9.0)
    loss = LOSSES["sigmoid"].fn(PairLogps(logps, others, logps, others), 0.1)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))
    assert torch.equal(rewards(logps, logps, 0.1), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(rewards(t(-1.0), t(-3.0), 0.5), t(1.0))  # beta * (policy - reference)
    assert ipo_loss(PairLogps(logps, others, logps, others), 0.1).allclose(torch.full((3,), 25.0, dtype=torch.float64))


# --- the seed's gradient -------------------------------------------------------------------------


def test_autograd_matches_the_seed_gradient_formula(demo_assets):
    """grad L = -beta * sigma(r_l - r_w) * (grad log pi(y_w) - grad log pi(y_l)), per pair, averaged.

    Left: our pipeline (one shared-prefix forward, sigmoid loss, autograd). Right: each
    sequence's log-prob separately in float64 (full logits), its gradient by its own backward
    pass, combined with the seed's weights.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]), dtype=torch.float32)
    pairs = [([5, 9, 13, 2], [40, 41, 42], [50, 51]), ([7, 8], [60, 61, 62, 63], [70])]
    ref_chosen, ref_rejected = t(-20.0, -30.0), t(-15.0, -6.0)
    beta = 0.5

    model.zero_grad()
    chosen, rejected = pair_logps(model, *map(list, zip(*pairs)), PairOptions(shared=True))
    loss = sigmoid_loss(PairLogps(chosen.double(), rejected.double(), ref_chosen, ref_rejected), beta).mean()
    loss.backward()
    ours = {n: p.grad.double().clone() for n, p in model.named_parameters()}

    expected = seed_formula_gradient(demo_assets["model"], pairs, ref_chosen, ref_rejected, beta)
    for name, grad in ours.items():
        assert torch.allclose(grad, expected[name], rtol=1e-3, atol=1e-6), name
    assert max(g.abs().max() for g in expected.values()) > 1e-3  # the check is not vacuous


# --- training ------------------------------------------------------------------------------------


@pytest.fixture
def demo_config(prepared_demo):
    return lambda **train_overrides: prepared_demo({**DEMO_TRAIN, **train_overrides})


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / paths.METRICS).read_text().splitlines()]


def test_training_learns_the_demo_rule_with_one_model(demo_config, monkeypatch):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    constructed = []
    real_init = PreTrainedModel.__init__

    def counting_init(self, *args, **kwargs):
        constructed.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    cfg = demo_config()
    monkeypatch.setattr(PreTrainedModel, "__init__", counting_init)
    result = train(cfg, show_progress=False)
    monkeypatch.setattr(PreTrainedModel, "__init__", real_init)
    # The policy and the decoder stack inside it: no reference model, no second copy.
    assert constructed == ["LlamaForCausalLM", "LlamaModel"]

    rows = metrics(result.run_dir)
    first_step = next(r for r in rows if r["step"] == 1 and "loss" in r)
    assert first_step["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert abs(first_step["rewards/margins"]) < 1e-5
    step0 = next(r for r in rows if "step0/max_mean_token_diff" in r)
    assert step0["step0/max_mean_token_diff"] < 1e-4
    final = result.summary["final_eval"]
    assert final["eval/rewards/accuracies"] > 0.75  # chance is 0.5
    assert final["eval/loss"] < math.log(2) - 0.2
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens/s"):
        assert key in first_step
    reloaded = AutoModelForCausalLM.from_pretrained(result.summary["final_dir"])
    initial = AutoModelForCausalLM.from_pretrained(cfg.model.path)
    assert reloaded.config.vocab_size == initial.config.vocab_size
    assert not torch.equal(reloaded.lm_head.weight, initial.lm_head.weight)  # it trained
    again = train(cfg, show_progress=False)
    assert again.skipped and again.run_dir == result.run_dir


def test_grad_accum_equals_one_big_batch(demo_config):
    big = train(demo_config(max_steps=3, run_name="big", per_device_train_batch_size=8, gradient_accumulation_steps=1,
                             eval_steps=0), show_progress=False)
    small = train(demo_config(max_steps=3, run_name="small", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                               eval_steps=0), show_progress=False)
    a = [r for r in metrics(big.run_dir) if "grad_norm" in r]
    b = [r for r in metrics(small.run_dir) if "grad_norm" in r]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("tokens/s", "seconds")} for r in rows]


def test_resume_after_crash_is_bit_identical(demo_config, monkeypatch):
    cfg = demo_config(max_steps=12, save_steps=4, eval_steps=5, run_name="whole")
    whole = train(cfg, show_progress=False)
    expected_weights = (whole.run_dir / "final" / "model.safetensors").read_bytes()

    cfg = demo_config(max_steps=12, save_steps=4, eval_steps=5, run_name="crashed")
    crash_training_at(monkeypatch, cfg, 10)
    with pytest.raises(TrainError, match="--resume"):
        train(cfg, show_progress=False)
    resumed = train(cfg, resume=True, show_progress=False)
    assert (resumed.run_dir / "final" / "model.safetensors").read_bytes() == expected_weights
    assert _without_timing(metrics(resumed.run_dir)) == _without_timing(metrics(whole.run_dir))


@pytest.mark.slow  # a real kill -9 of a child process: ~40 s; CI runs it in make test-slow
def test_kill_9_then_resume_is_bit_identical(tmp_path, demo_assets):
    dpo = str(Path(sys.executable).parent / "dpo")

    def config(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({
            "storage": str(tmp_path / name),
            "data": {"path": str(demo_assets["data"])},
            "model": {"path": str(demo_assets["model"])},
            "tokenize": {"max_length": 128, "max_prompt_length": 64},
            "train": {**DEMO_TRAIN, "max_steps": 150, "save_steps": 10, "eval_steps": 50, "run_name": "r"},
        }))
        return str(path)

    env = {**os.environ, "DPO_HASH_CACHE": str(tmp_path / "hashes")}
    for name in ("a", "b"):
        for stage in ("prepare", "score"):
            subprocess.run([dpo, stage, "-c", config(name), "--no-progress"], check=True, capture_output=True, env=env)
    subprocess.run([dpo, "train", "-c", config("a"), "--no-progress"], check=True, capture_output=True, env=env)

    proc = subprocess.Popen([dpo, "train", "-c", config("b"), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    checkpoint = tmp_path / "b" / "runs" / "r" / "checkpoints" / "step-000020"
    deadline = time.time() + 180
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "runs" / "r" / "final").exists(), "finished before the kill"
    done = subprocess.run([dpo, "train", "-c", config("b"), "--resume", "--no-progress"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr
    run_a, run_b = tmp_path / "a" / "runs" / "r", tmp_path / "b" / "runs" / "r"
    assert (run_a / "final" / "model.safetensors").read_bytes() == (run_b / "final" / "model.safetensors").read_bytes()
    assert _without_timing(metrics(run_a)) == _without_timing(metrics(run_b))


# --- the contract between dataset and cache --------------------------------------------------------


def _copy_cache(cfg, tmp_path, edit) -> Path:
    """A copy of the config's cache with its shard rewritten by ``edit(table) -> table``, its
    value checksums and its manifest updated to match (a consistent cache that breaks the
    contract, not a damaged one)."""
    from pipeline.storage.refvalues import COLUMNS_KEY, column_digests
    from pipeline.store import sha256_file

    source = next(Path(cfg.storage, "refscores").iterdir())
    target = tmp_path / "edited-cache"
    shutil.copytree(source, target)
    shard = target / "part-00000.parquet"
    table = edit(pq.read_table(shard))
    metadata = {**table.schema.metadata, COLUMNS_KEY.encode(): column_digests(table).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), shard)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["shards"][0].update(sha256=sha256_file(shard, use_cache=False), rows=table.num_rows)
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_contract_mismatches_are_refused(demo_config, tmp_path, demo_assets):
    cfg = demo_config(max_steps=2)

    def refuse(cache, match):
        cfg.train.ref_cache = str(cache)
        with pytest.raises((TrainError, CacheError), match=match):
            train(cfg, show_progress=False)

    refuse(_copy_cache(cfg, tmp_path, lambda tb: tb.slice(1)), "1 examples have no reference score")
    shutil.rmtree(tmp_path / "edited-cache")

    def set_columns(tb, **columns):
        for name, values in columns.items():
            tb = tb.set_column(tb.schema.get_field_index(name), name, pa.array(values, tb.schema.field(name).type))
        return tb

    def more_tokens(tb):  # one more token, with its value: consistent in itself, not with the dataset
        counts, logps = tb.column("chosen_tokens").to_pylist(), tb.column("chosen_logp").to_pylist()
        per_token = tb.column("chosen_token_logps").to_pylist()
        counts[3], logps[3], per_token[3] = counts[3] + 1, logps[3] - 1.0, per_token[3] + [-1.0]
        return set_columns(tb, chosen_tokens=counts, chosen_logp=logps, chosen_token_logps=per_token)

    refuse(_copy_cache(cfg, tmp_path, more_tokens), "different chosen token count")
    shutil.rmtree(tmp_path / "edited-cache")

    def shifted(tb):  # another model's values: each chosen response 5 nats less likely, consistently
        per_token = [[v[0] - 5.0, *v[1:]] for v in tb.column("chosen_token_logps").to_pylist()]
        sums = [float(np.sum(np.asarray(v, np.float32), dtype=np.float64)) for v in per_token]
        return set_columns(tb, chosen_logp=sums, chosen_token_logps=per_token)

    stale = _copy_cache(cfg, tmp_path, shifted)
    refuse(stale, "step-0 check")
    cfg.train.step0_check = "warn"
    cfg.train.run_name = "warned"
    assert train(cfg, show_progress=False).summary["complete"]  # warn-only goes on
    cfg.train.step0_check = "error"

    # A cache of another dataset.
    other = config_from_dict({
        "storage": str(tmp_path / "other"),
        "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.5},
        "model": {"path": str(demo_assets["model"])},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
    })
    prepare(other, show_progress=False)
    other_cache = score(other, show_progress=False).output_dir
    refuse(other_cache, "was scored on dataset")
    manifest = json.loads((other_cache / "manifest.json").read_text())
    (other_cache / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    refuse(other_cache, "incomplete")


def test_bfloat16_autocast_and_gradient_checkpointing(demo_config):
    """bf16 under autocast against a float32 cache (the step-0 check uses the half tolerance)."""
    cfg = demo_config(max_steps=3, eval_steps=0, gradient_checkpointing=True, run_name="bf16")
    cfg.model.dtype = "bfloat16"  # the float32 cache of these weights is the only one: it is used
    result = train(cfg, show_progress=False)
    rows = metrics(result.run_dir)
    step0 = next(r for r in rows if "step0/tolerance" in r)
    assert step0["step0/tolerance"] == 0.35 and 0 < step0["step0/max_mean_token_diff"] < 0.35
    losses = [r["loss"] for r in rows if "grad_norm" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
