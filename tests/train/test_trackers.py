"""train.report_to: TensorBoard event files and an MLflow file store, written and read back."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import ConfigError
from pipeline.storage import paths
from pipeline.train.stage import train

TRAIN = {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_steps": 4, "eval_steps": 2, "save_steps": 0,
         "warmup_steps": 2, "lr_scheduler_type": "linear"}


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / paths.METRICS).read_text().splitlines()]


def test_tensorboard_and_mlflow_get_what_metrics_jsonl_gets(prepared_demo, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = prepared_demo({**TRAIN, "report_to": ["tensorboard", "mlflow"], "run_name": "tracked"})
    result = train(cfg, show_progress=False)
    records = _records(result.run_dir)
    train_steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train_steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 2, 4]
    # TRL's names: learning_rate (warmup from 0: 0, then lr / 2 at step 2 of 2 warmup steps)
    assert [r["learning_rate"] for r in train_steps][:2] == [0.0, pytest.approx(5e-4)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.run_dir / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/rewards/accuracies", "eval/loss"} <= tags
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train_steps]
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(result.run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("dpo-pipeline")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"], rel=1e-6))
                                                          for r in train_steps]
    eval_accuracy = client.get_metric_history(run.info.run_id, "eval/rewards/accuracies")
    assert sorted(m.step for m in eval_accuracy) == [0, 2, 4]
    assert run.data.params["train.learning_rate"] == "0.001"


def test_report_to_names_are_checked(prepared_demo):
    with pytest.raises(ConfigError, match="train.report_to"):
        prepared_demo({**TRAIN, "report_to": "tensorbord"})
    with pytest.raises(ConfigError, match="use none, or any of"):
        prepared_demo({**TRAIN, "report_to": ["none", "mlflow"]})


def test_no_tracker_by_default(prepared_demo):
    result = train(prepared_demo({**TRAIN, "run_name": "plain"}), show_progress=False)
    assert not (result.run_dir / "runs").exists() and not (result.run_dir / "mlruns").exists()


def test_checkpoints_load_with_from_pretrained_and_final_has_a_model_card(prepared_demo):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = prepared_demo({**TRAIN, "save_steps": 2, "run_name": "carded"})
    result = train(cfg, show_progress=False)
    checkpoint = result.run_dir / "checkpoints" / "step-000002"
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint))  # config and weights beside each other
    AutoTokenizer.from_pretrained(str(checkpoint))
    saved = load_file(str(checkpoint / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    card = (result.run_dir / "final" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: transformers" in card
    assert "| eval/rewards/accuracies |" in card and "Step-0 check" in card and "learning_rate: 0.001" in card
    assert "final/README.md" in result.summary["files"]  # part of what run.json vouches for


def test_report_html_is_written_at_evals_and_at_the_end(prepared_demo, monkeypatch):
    import pipeline.train.final as final_module
    import pipeline.train.metrics_log as metrics_log_module

    written = []
    real = metrics_log_module.write_run_report
    recording = (lambda run_dir, records, config, final=None: written.append(
        (max(r["step"] for r in records), final is not None)) or real(run_dir, records, config, final))
    for module in (metrics_log_module, final_module):  # at evals (metrics_log.py), at the end (final.py)
        monkeypatch.setattr(module, "write_run_report", recording)
    result = train(prepared_demo({**TRAIN, "run_name": "reported"}), show_progress=False)
    assert written == [(2, False), (4, False), (4, True)]  # eval at step 2, eval at 4, the end
    page = (result.run_dir / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 4 and "finished" in page
    assert "Step-0 check" in page and "learning_rate: 0.001" in page and "<td>0.0" in page


@pytest.mark.slow  # a headless browser: CI runs it in make test-slow
def test_report_html_renders_in_chromium(prepared_demo, tmp_path):
    from tests.conftest import assert_plots_render

    result = train(prepared_demo({**TRAIN, "run_name": "browsed"}), show_progress=False)
    assert_plots_render(result.run_dir / "report.html", tmp_path)
