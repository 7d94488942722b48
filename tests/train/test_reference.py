"""What the train stage reads of the reference: nothing for a reference-free loss (simpo, orpo:
no score stage, no cache, no step-0 check, an identity without a cache), and the per-token
reference log-probs when a setting needs them (train.max_completion_length: responses cut at
training time, the reference sums recomputed from the cached prefix)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pa_dataset
import pytest
import torch

from pipeline.config.load import config_from_dict
from pipeline.errors import CacheError, ConfigError, TrainError
from pipeline.prepare.stage import prepare
from pipeline.score.stage import score
from pipeline.storage import paths
from pipeline.store import fingerprint
from pipeline.train.batches import ValueLists, load_split_data
from pipeline.train.stage import finished_run, train

from tests.helpers import run_metrics

QUICK = {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "warmup_steps": 2, "eval_steps": 0,
         "save_steps": 0, "max_steps": 3}


@pytest.fixture
def demo(tmp_path, demo_assets):
    """demo(train_section, score_section=None) -> Config on the demo data and model (not prepared)."""

    def make(train: dict, score: dict | None = None):
        return config_from_dict({
            "storage": str(tmp_path / "storage"),
            "data": {"path": str(demo_assets["data"]), "eval_fraction": 0.05},
            "model": {"path": str(demo_assets["model"])},
            "tokenize": {"max_length": 128, "max_prompt_length": 64},
            "score": score or {},
            "train": train,
        })

    return make


def test_which_configs_need_the_reference(demo):
    assert demo({"loss_type": "simpo"}).train.needs_reference() is False
    assert demo({"loss_type": ["simpo", "orpo"]}).train.needs_reference() is False
    assert demo({"loss_type": ["simpo", "sigmoid"]}).train.needs_reference() is True
    assert demo({}).train.needs_reference() is True
    assert demo({}).train.needs_token_reference() is False
    assert demo({"max_completion_length": 8}).train.needs_token_reference() is True
    assert demo({"ld_alpha": 0.5}).train.needs_token_reference() is True
    # a reference-free loss cuts the policy's responses only: no reference values to recompute
    assert demo({"loss_type": "simpo", "max_completion_length": 8}).train.needs_token_reference() is False
    with pytest.raises(ConfigError, match="train.max_completion_length"):
        demo({"max_completion_length": 0})


# --- 1. reference-free: no cache -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_train_a_dataset_never_scored(demo, name, caplog):
    cfg = demo({**QUICK, "loss_type": name, "beta": 1.0})
    prepare(cfg, show_progress=False)
    with caplog.at_level(logging.INFO, logger="dpo.train"):
        result = train(cfg, show_progress=False)
    assert not (Path(cfg.storage) / "refscores").exists()  # nothing scored, nothing looked for
    steps = [r for r in run_metrics(result.run_dir) if "grad_norm" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert not any("step0/max_mean_token_diff" in r for r in run_metrics(result.run_dir))
    assert f"loss_type {name} is reference-free: no reference cache, so no step-0 check" in caplog.text
    summary = json.loads((result.run_dir / "run.json").read_text())
    assert summary["refscores_dir"] is None and summary["inputs"]["refscores"] is None
    assert math.isfinite(summary["final_eval"]["eval/loss"])
    assert "reference-free" in (result.run_dir / "final" / "README.md").read_text()
    # the identity is stable: a second train is up to date, and a launcher finds the run
    assert train(cfg, show_progress=False).skipped
    assert finished_run(cfg).run_dir == result.run_dir


def test_reference_free_identity_names_no_cache_and_differs_from_reference_runs(demo):
    simpo, sigmoid = demo({"loss_type": "simpo"}), demo({})
    identity = paths.run_identity(simpo, "d" * 64, None, {"sha": "x"})
    assert identity["refscores"] is None
    assert fingerprint(identity) == fingerprint(paths.run_identity(simpo, "d" * 64, None, {"sha": "x"}))
    assert fingerprint(identity) != fingerprint(paths.run_identity(sigmoid, "d" * 64, None, {"sha": "x"}))
    assert fingerprint(identity) != fingerprint(paths.run_identity(simpo, "d" * 64, "c" * 64, {"sha": "x"}))


def test_reference_free_run_ignores_a_cache_that_exists(demo):
    """Scored or not, the same run: its identity and data do not depend on a cache."""
    cfg = demo({**QUICK, "loss_type": "simpo", "max_steps": 1, "beta": 1.0})
    prepare(cfg, show_progress=False)
    assert finished_run(cfg) is None
    unscored = train(cfg, show_progress=False)  # no cache exists: none is looked for
    assert unscored.summary["refscores_dir"] is None and unscored.summary["inputs"]["refscores"] is None
    score(cfg, show_progress=False)
    again = finished_run(cfg)  # the same identity, so the same finished run
    assert again is not None and again.run_dir == unscored.run_dir
    assert again.summary["fingerprint"] == unscored.summary["fingerprint"]
    assert train(cfg, show_progress=False).skipped


def test_a_mixture_with_a_reference_loss_needs_the_cache(demo):
    cfg = demo({**QUICK, "loss_type": ["simpo", "sigmoid"]})
    prepare(cfg, show_progress=False)
    with pytest.raises(CacheError, match=r"no reference scores of this dataset .*run `dpo score -c CONFIG` first"):
        train(cfg, show_progress=False)


# --- 2. per-token reference values ---------------------------------------------------------------


def test_value_lists_store_per_token_values_compactly():
    column = pa.array([[0.5, -1.0, -2.0], [], [-0.25]], type=pa.list_(pa.float32()))
    lists = ValueLists(column)
    assert len(lists) == 3 and lists.values.dtype == np.float32
    assert lists[0].tolist() == [0.5, -1.0, -2.0] and lists[1].tolist() == [] and lists[2].tolist() == [-0.25]
    assert lists.sums().tolist() == [-2.5, 0.0, -0.25] and lists.sums().dtype == np.float64
    cut = lists.truncated(2)
    assert [cut[i].tolist() for i in range(3)] == [[0.5, -1.0], [], [-0.25]]
    assert cut.lengths().tolist() == [2, 0, 1] and lists.lengths().tolist() == [3, 0, 1]


def _record_policy_inputs(monkeypatch, trainer_class, seen: list[int]) -> None:
    """Note the longest response of every forward of the policy (Trainer.token_logps, which every
    forward goes through; Trainer.pair_logps where there is no token_logps)."""
    name = "token_logps" if hasattr(trainer_class, "token_logps") else "pair_logps"
    real = getattr(trainer_class, name)

    def recording(self, split, index, *args, **kwargs):
        seen.append(max(max(len(split.chosens[i]), len(split.rejecteds[i])) for i in index))
        return real(self, split, index, *args, **kwargs)

    monkeypatch.setattr(trainer_class, name, recording)


def _cache_rows(cache_dir: Path) -> dict:
    table = pa_dataset.dataset(sorted(str(p) for p in cache_dir.glob("part-*.parquet")), format="parquet").to_table()
    return {row["id"]: row for row in table.to_pylist()}


def test_per_token_reference_loaded_only_when_asked(demo):
    cfg = demo({})
    dataset_dir = prepare(cfg, show_progress=False).output_dir
    cache_dir = score(cfg, show_progress=False).output_dir
    plain, _ = load_split_data(dataset_dir, cache_dir)
    assert plain["train"].ref_chosen_token_logps is None
    splits, _ = load_split_data(dataset_dir, cache_dir, token_reference=True)
    rows = _cache_rows(cache_dir)
    split = splits["train"]
    for i in (0, 7, len(split) - 1):
        row = rows[split.ids[i]]
        assert split.ref_chosen_token_logps[i].tolist() == pytest.approx(row["chosen_token_logps"], abs=0)
        assert split.ref_rejected_token_logps[i].tolist() == pytest.approx(row["rejected_token_logps"], abs=0)
        assert len(split.ref_chosen_token_logps[i]) == len(split.chosens[i])


# --- 3. train.max_completion_length --------------------------------------------------------------


def test_truncation_recomputes_the_reference_sums_from_the_stored_prefix(demo):
    cfg = demo({})
    dataset_dir = prepare(cfg, show_progress=False).output_dir
    cache_dir = score(cfg, show_progress=False).output_dir
    splits, _ = load_split_data(dataset_dir, cache_dir, token_reference=True)
    rows = _cache_rows(cache_dir)
    n = 5
    for split in splits.values():
        cut = split.truncated(n)
        assert len(cut) == len(split) and cut.ids == split.ids
        longer = 0
        for i in range(len(split)):
            row = rows[split.ids[i]]
            for side, ids, ref, full_ids in (("chosen", cut.chosens, cut.ref_chosen, split.chosens),
                                             ("rejected", cut.rejecteds, cut.ref_rejected, split.rejecteds)):
                assert ids[i] == full_ids[i][:n]  # the policy sees the first n tokens
                if len(full_ids[i]) > n:
                    longer += 1
                    expected = np.sum(np.asarray(row[f"{side}_token_logps"][:n], dtype=np.float64))
                    assert ref[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
                else:  # within n: the cached sum, untouched
                    assert ref[i].item() == row[f"{side}_logp"]
            assert cut.ref_chosen_token_logps[i].tolist() == split.ref_chosen_token_logps[i][:n].tolist()
        assert cut.ref_chosen.dtype == torch.float64
    assert longer > 0  # the demo has responses longer than 5 tokens


def test_max_completion_length_trains_on_the_cut_responses(demo, monkeypatch):
    import pipeline.train.stage as train_module

    base = demo({**QUICK, "max_steps": 1, "run_name": "uncut"})
    prepare(base, show_progress=False)
    score(base, show_progress=False)
    seen: list[int] = []
    _record_policy_inputs(monkeypatch, train_module.Trainer, seen)
    cut = train(demo({**QUICK, "max_steps": 1, "max_completion_length": 4, "run_name": "cut4"}), show_progress=False)
    assert seen and max(seen) <= 4
    records = run_metrics(cut.run_dir)
    step0 = next(r for r in records if "step0/max_mean_token_diff" in r)  # the cut sums agree with the policy
    assert step0["step0/max_mean_token_diff"] < 1e-4
    first = next(r for r in records if r["step"] == 1 and "grad_norm" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference on the prefix too
    assert json.loads((cut.run_dir / "run.json").read_text())["inputs"]["train"]["max_completion_length"] == 4
    monkeypatch.undo()

    # longer than every response: the same run as without it (another identity, the same numbers)
    uncut = train(base, show_progress=False)
    long = train(demo({**QUICK, "max_steps": 1, "max_completion_length": 10_000, "run_name": "cut-long"}),
                 show_progress=False)
    a = next(r for r in run_metrics(uncut.run_dir) if r["step"] == 1 and "grad_norm" in r)
    b = next(r for r in run_metrics(long.run_dir) if r["step"] == 1 and "grad_norm" in r)
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    assert "max_completion_length" not in json.loads((uncut.run_dir / "run.json").read_text())["inputs"]["train"]


def test_a_cache_without_per_token_values_is_refused(demo):
    cfg = demo({**QUICK, "max_completion_length": 8}, score={"store_token_logps": False})
    prepare(cfg, show_progress=False)
    score(cfg, show_progress=False)
    with pytest.raises(TrainError, match=r"scored without them \(score.store_token_logps: false\): set "
                                         r"score.store_token_logps: true and run `dpo score -c CONFIG` again"):
        train(cfg, show_progress=False)
    cfg.train.max_completion_length = None  # without the option it trains on that cache
    cfg.train.max_steps = 1
    assert train(cfg, show_progress=False).summary["complete"]


def test_reference_free_max_completion_length_cuts_without_a_cache(demo, monkeypatch):
    import pipeline.train.stage as train_module

    cfg = demo({**QUICK, "max_steps": 1, "loss_type": "orpo", "beta": 1.0, "max_completion_length": 3})
    prepare(cfg, show_progress=False)
    seen: list[int] = []
    _record_policy_inputs(monkeypatch, train_module.Trainer, seen)
    result = train(cfg, show_progress=False)
    assert seen and max(seen) <= 3 and result.summary["refscores_dir"] is None
