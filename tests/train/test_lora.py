"""LoRA (train.peft): step-0 check against the base's cache, only adapters train, final/ in peft's
format (+ merged/), checkpoints of adapters only with exact resume, and the train.init_from rule."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pipeline.train.final as final_module
from pipeline.config.load import config_from_dict
from pipeline.errors import ConfigError, TrainError
from pipeline.logprobs.response import pair_logps
from pipeline.models.assets import DEMO_TRAIN
from pipeline.prepare.stage import prepare
from pipeline.score.stage import score
from pipeline.storage import paths, trust
from pipeline.store import fingerprint
from pipeline.train.stage import train

from tests.conftest import crash_training_at

pytest.importorskip("peft")

LORA = {"r": 8, "lora_alpha": 16}
# Token ids of a few (prompt, chosen, rejected) triples, to compare models on.
PAIRS = ([[5, 9, 13, 2], [7, 8], [30, 31, 32]], [[40, 41, 42], [60, 61, 62, 63], [33]], [[50, 51], [70], [34, 35]])


@pytest.fixture(scope="module")
def lora_config(tmp_path_factory, demo_assets):
    """make(**train) -> a config on the demo, prepared and scored once for the module."""
    storage = tmp_path_factory.mktemp("lora") / "storage"

    def make(**train_overrides):
        return config_from_dict({
            "storage": str(storage),
            "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.1},
            "model": {"path": str(demo_assets["model"])},
            "tokenize": {"max_length": 128, "max_prompt_length": 64},
            "train": {**DEMO_TRAIN, "save_steps": 0, "peft": dict(LORA), "learning_rate": 1e-2, **train_overrides},
        })

    cfg = make()
    prepare(cfg, show_progress=False)
    score(cfg, show_progress=False)
    return make


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / paths.METRICS).read_text().splitlines()]


def _logps(model):
    model.eval()
    with torch.no_grad():
        return torch.cat(pair_logps(model, *PAIRS))


def test_lora_trains_only_adapters_from_the_cached_base_and_saves_peft_format(lora_config, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    cfg = lora_config(run_name="lora", merge_adapter=True)  # the demo's 60 steps
    seen = {}
    real_whole_policy = final_module.whole_policy

    def whole_policy(trainer):  # the trained policy, before final/ merges it
        trainable = [p for p in trainer.policy.parameters() if p.requires_grad]
        seen["trainable"] = len(trainable)
        seen["optimized"] = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        seen["states"] = len(trainer.optimizer.state)
        seen["frozen"] = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if not p.requires_grad}
        seen["logps"] = _logps(trainer.policy)
        return real_whole_policy(trainer)

    monkeypatch.setattr(final_module, "whole_policy", whole_policy)
    result = train(cfg, show_progress=False)
    monkeypatch.setattr(final_module, "whole_policy", real_whole_policy)

    # Step 0: LoRA starts at B = 0, so the policy is the base, whose log-probs the cache holds.
    rows = _metrics(result.run_dir)
    step0 = next(r for r in rows if "step0/max_mean_token_diff" in r)
    assert step0["step0/max_mean_token_diff"] < 1e-4
    first_step = next(r for r in rows if r["step"] == 1 and "loss" in r)
    assert first_step["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.summary["final_eval"]["eval/rewards/accuracies"] > 0.75  # full fine-tuning: ~0.85

    # Only the adapters train: the optimizer holds them alone, and the base weights did not move.
    assert 0 < seen["trainable"] == len(seen["optimized"]) == seen["states"]
    assert all(p.requires_grad for p in seen["optimized"])
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path)
    base_weights = dict(base.named_parameters())
    for name, weight in seen["frozen"].items():
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(weight, base_weights[plain]), name

    # final/: the adapter in peft's format, which loads both ways and computes what was trained.
    final = result.run_dir / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == cfg.model.path
    listed = {str(p.relative_to(result.run_dir)) for p in final.rglob("*") if p.is_file()}
    assert set(result.summary["files"]) == listed and "final/merged/model.safetensors" in listed
    assert trust.verified_run(result.run_dir) is not None
    loaded = PeftModel.from_pretrained(base, str(final))
    assert torch.allclose(_logps(loaded), seen["logps"], atol=1e-5)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(final))
    assert torch.allclose(_logps(auto), seen["logps"], atol=1e-5)
    assert not torch.allclose(_logps(AutoModelForCausalLM.from_pretrained(cfg.model.path)), seen["logps"], atol=1e-3)

    # final/merged/: a full model whose logits equal the adapter model's.
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged"))
    ids = torch.tensor([PAIRS[0][0] + PAIRS[1][0]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, auto(ids).logits, atol=1e-5)
    assert train(cfg, show_progress=False).skipped


def test_lora_checkpoints_hold_only_adapters_and_resume_is_bit_identical(lora_config, monkeypatch):
    # Dropout draws random numbers, so the RNG state in the checkpoint matters.
    settings = {"max_steps": 8, "save_steps": 3, "eval_steps": 4,
                "peft": {**LORA, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}}
    whole = train(lora_config(run_name="lora-whole", **settings), show_progress=False)
    expected = (whole.run_dir / "final" / "adapter_model.safetensors").read_bytes()

    cfg = lora_config(run_name="lora-crashed", **settings)
    crash_training_at(monkeypatch, cfg, 7)
    checkpoint = whole.run_dir.parent / "lora-crashed" / "checkpoints" / "step-000006"
    assert not (checkpoint / "model.safetensors").exists()
    tensors = load_file(str(checkpoint / "trained.safetensors"))
    assert tensors and all(".lora_A." in n or ".lora_B." in n for n in tensors)
    assert {n.split(".")[-4] for n in tensors} == {"q_proj", "v_proj"}
    with pytest.raises(TrainError, match="--resume"):
        train(cfg, show_progress=False)
    resumed = train(cfg, resume=True, show_progress=False)
    assert (resumed.run_dir / "final" / "adapter_model.safetensors").read_bytes() == expected

    def without_timing(rows):
        return [{k: v for k, v in r.items() if k not in ("tokens/s", "seconds")} for r in rows]

    assert without_timing(_metrics(resumed.run_dir)) == without_timing(_metrics(whole.run_dir))


def test_peft_settings_are_part_of_the_run_identity(lora_config):
    a, b, full = lora_config(), lora_config(peft={**LORA, "r": 4}), lora_config(peft=None)
    assert len({fingerprint(paths.run_identity(c, "d", "c", {})) for c in (a, b, full)}) == 3
    assert paths.run_identity(a, "d", "c", {})["train"]["peft"]["r"] == 8


def test_init_from_must_be_the_scored_model(lora_config, tmp_path, demo_assets):
    """A run is scored against the model it starts from: train.init_from must hold model.path's
    weights (the cache's model); other weights, or an adapter, are refused with what to do."""
    from pipeline.models.adapters import with_lora
    from pipeline.models.loading import load_causal_lm, model_fingerprint

    model = Path(demo_assets["model"])
    same = tmp_path / "same-weights"
    shutil.copytree(model, same)
    cfg = lora_config(init_from=str(same))
    scored = json.loads(next(Path(cfg.storage, "refscores").glob("*/manifest.json")).read_text())
    # The same weights elsewhere: allowed, and the step-0 check runs (the init is the cache's model).
    assert model_fingerprint(paths.policy_init(cfg)) == scored["inputs"]["model"]

    other = tmp_path / "sft"
    shutil.copytree(model, other)
    weights = load_file(str(other / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="holds other weights than model.path.*set model.path to it"):
        train(lora_config(run_name="init-other", init_from=str(other)), show_progress=False)

    adapter = tmp_path / "adapter"
    with_lora(load_causal_lm(paths.policy_init(cfg)), cfg.train.peft).save_pretrained(adapter)
    with pytest.raises(ConfigError, match="is a LoRA adapter.*merge"):
        train(lora_config(run_name="init-adapter", init_from=str(adapter)), show_progress=False)
