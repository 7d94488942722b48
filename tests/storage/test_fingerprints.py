"""The fingerprints of datasets, reference caches and runs, pinned.

A fingerprint names a stage's output folder, and a stage skips its work when the folder for the
same inputs exists: a fingerprint that changes with a refactoring makes every user's prepared
datasets, scored caches and runs invisible (all recomputed, the runs not resumed). These values
were computed before issue 21 moved code between modules; they may change only with a schema
version (paths.*_SCHEMA_VERSION), on purpose.

The inputs are literal bytes (a model folder whose files the fingerprints hash but nothing loads,
a JSONL file), so the pins depend on the identity code alone, not on a tokenizer or torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config.load import config_from_dict
from pipeline.storage import locate, paths
from pipeline.store import fingerprint

ROWS = [{"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "rejected": f" No {i}."} for i in range(4)]

MODEL_FILES = {
    "config.json": json.dumps({"model_type": "llama", "vocab_size": 32}),
    "model.safetensors": "not read: only hashed",
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}),
    "tokenizer_config.json": json.dumps({"eos_token": "</s>"}),
}

# {case: (train section, dataset fp, cache fp, run fp)}; cases differ in the keys that changed
# over the project's history (loss mixtures, LoRA, precision, reference-free, DDP batch split).
TRAIN_CASES = {
    "default": {},
    "sigmoid+sft mixture": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    "ipo, beta 0.3, cosine": {"loss_type": "ipo", "beta": 0.3, "lr_scheduler_type": "cosine"},
    "lora": {"peft": {"r": 8, "lora_alpha": 16}},
    "simpo (reference-free)": {"loss_type": "simpo", "simpo_gamma": 0.7},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "ld, wpo, rpo, cut": {"ld_alpha": 0.5, "use_weighting": True, "rpo_alpha": 0.1, "max_completion_length": 16},
    "2 processes x 2 x 2": {"nproc_per_node": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
    "1 process x 8 (same effective batch)": {"per_device_train_batch_size": 8},
    "named run": {"run_name": "my-run"},
}

PINS = {
    "default": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "d81a3fa3312599d496dacf18f5a684c0672499d94938109a1fd9071c4f022c45",
        "cache_vllm": "182db4c4495c71f953bfc0b5def6813dce7092c1be34bba986388e3faada8ecf",
        "run": "9faa30177d6a9d9d6ad6794d821bd843036047d462c81b23a33628dd8bed83d9",
        "run_dir": "dpo-9faa30177d6a",
    },
    "sigmoid+sft mixture": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "d81a3fa3312599d496dacf18f5a684c0672499d94938109a1fd9071c4f022c45",
        "cache_vllm": "182db4c4495c71f953bfc0b5def6813dce7092c1be34bba986388e3faada8ecf",
        "run": "402ce8160ca39aca10766cb8ef6fce0ef461ccb70fd0677eda09da6268f81cbf",
        "run_dir": "dpo-402ce8160ca3",
    },
    "ipo, beta 0.3, cosine": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "d81a3fa3312599d496dacf18f5a684c0672499d94938109a1fd9071c4f022c45",
        "cache_vllm": "182db4c4495c71f953bfc0b5def6813dce7092c1be34bba986388e3faada8ecf",
        "run": "ee73acda145221af6df4f670e2d20c502f1792c795a04de8335126cb6bc10e6b",
        "run_dir": "dpo-ee73acda1452",
    },
    "lora": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "d81a3fa3312599d496dacf18f5a684c0672499d94938109a1fd9071c4f022c45",
        "cache_vllm": "182db4c4495c71f953bfc0b5def6813dce7092c1be34bba986388e3faada8ecf",
        "run": "8d1488b6ca4c032e8e7e08f06e1854b62870fedb31c42e4efb0dc6652812eb96",
        "run_dir": "dpo-8d1488b6ca4c",
    },
    "simpo (reference-free)": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "d81a3fa3312599d496dacf18f5a684c0672499d94938109a1fd9071c4f022c45",
        "cache_vllm": "182db4c4495c71f953bfc0b5def6813dce7092c1be34bba986388e3faada8ecf",
        "run": "7027911ffe4bbf80a29cdcd09e95da5fb676d001ec6e6a2fee967fba3aaf3a99",
        "run_dir": "dpo-7027911ffe4b",
    },
    "bf16-mixed": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "d81a3fa3312599d496dacf18f5a684c0672499d94938109a1fd9071c4f022c45",
        "cache_vllm": "182db4c4495c71f953bfc0b5def6813dce7092c1be34bba986388e3faada8ecf",
        "run": "dc4e26e541dcf19dd528fd1b438d172af9275f4728ff4e9c7479015b22f9ea18",
        "run_dir": "dpo-dc4e26e541dc",
    },
    "ld, wpo, rpo, cut": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "d81a3fa3312599d496dacf18f5a684c0672499d94938109a1fd9071c4f022c45",
        "cache_vllm": "182db4c4495c71f953bfc0b5def6813dce7092c1be34bba986388e3faada8ecf",
        "run": "3399f79ec22cd3566a49bb6a9934f1f1c9a8840ceff2b23a076fbdb1df76c3dd",
        "run_dir": "dpo-3399f79ec22c",
    },
    "2 processes x 2 x 2": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "d81a3fa3312599d496dacf18f5a684c0672499d94938109a1fd9071c4f022c45",
        "cache_vllm": "182db4c4495c71f953bfc0b5def6813dce7092c1be34bba986388e3faada8ecf",
        "run": "9faa30177d6a9d9d6ad6794d821bd843036047d462c81b23a33628dd8bed83d9",
        "run_dir": "dpo-9faa30177d6a",
    },
    "1 process x 8 (same effective batch)": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "d81a3fa3312599d496dacf18f5a684c0672499d94938109a1fd9071c4f022c45",
        "cache_vllm": "182db4c4495c71f953bfc0b5def6813dce7092c1be34bba986388e3faada8ecf",
        "run": "9faa30177d6a9d9d6ad6794d821bd843036047d462c81b23a33628dd8bed83d9",
        "run_dir": "dpo-9faa30177d6a",
    },
    "named run": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "d81a3fa3312599d496dacf18f5a684c0672499d94938109a1fd9071c4f022c45",
        "cache_vllm": "182db4c4495c71f953bfc0b5def6813dce7092c1be34bba986388e3faada8ecf",
        "run": "9faa30177d6a9d9d6ad6794d821bd843036047d462c81b23a33628dd8bed83d9",
        "run_dir": "my-run",
    },
    "prompt kept from its start": {
        "dataset": "ed4556e461c0c61a0c21146d7b0d8d3428d3279e4f0a283ae5c9ca5aac5cf013",
        "cache": "dcd8bf8a9af5b2438753d854ba06bcb26b00a09a32d2b084e18dd73a83cd7abf",
        "cache_vllm": "e59229d5234dc989048fa0e0ea02a8768d61a5304cc841318811670935394151",
        "run": "38c3216bc2b4a7adc34ce83a11ac213b4ba6f0256779cd84714bfd7c457d8811",
        "run_dir": "dpo-38c3216bc2b4",
    },
    "no per-token values, 512-row shards": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "f602f66cd9f1ee0e7d84a6eee1d738b3cd7114f4c586a61ada0b86f3638c4d5d",
        "cache_vllm": "8a965b34664f30b68a600b7c89dee2cf5368bb17fc1b2d0cba7c0d9feba3e580",
        "run": "f98ccec3918e3f11fb14d9aab3a09c471aa8b0096ca2d5eed81f27e7b016b738",
        "run_dir": "dpo-f98ccec3918e",
    },
    "model bfloat16": {
        "dataset": "9085a080d2cc2da3765bae29cb68ef475f2f722636532eadfc0627a6f5185aab",
        "cache": "737ddd3dc99714aaa64c51d4f77e04bc0a52a69183a3ab00fa21dbaa83cf6331",
        "cache_vllm": "435bd4857de81548495d7bb46d8b1951bde3b63f3cb3b5257fb6f0f5e1cdea8c",
        "run": "d56c7f3f1a73b6c4ea276b00427681ad2218c42c55914b8b45cf9104e70f7c0b",
        "run_dir": "dpo-d56c7f3f1a73",
    },
    "explicit columns": {
        "dataset": "99f536ed290eaaf8f9fd9e45f1d2c44110238077f8cda60f734ffaa4482a89af",
        "cache": "a2af56c03206c3b3242ab2717785b3efca88c5a0946dcac0084df4775adee8d8",
        "cache_vllm": "f60be5d8ae24a2064dd65814ba97e79cb0defe157efc2f7a7fe533a282544ab1",
        "run": "84c9e906c5d77996a1f5d4f4774b92a97aefc97fe9cb1301f290b827c0e87e11",
        "run_dir": "dpo-84c9e906c5d7",
    },
}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model"
    model.mkdir()
    for name, text in MODEL_FILES.items():
        (model / name).write_text(text)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return {"model": model, "data": data, "storage": tmp_path / "storage"}


def _config(files: dict[str, Path], train: dict, **sections):
    return config_from_dict({
        "storage": str(files["storage"]),
        "data": {"path": str(files["data"]), "eval_fraction": 0.25},
        "model": {"path": str(files["model"])},
        "tokenize": {"max_length": 96, "max_prompt_length": 32},
        "train": train,
        **sections,
    })


def fingerprints(files: dict[str, Path], train: dict, **sections) -> dict[str, str | None]:
    """The dataset's, the reference caches' (both backends) and the run's fingerprints, and the
    run folder's name, as the stages compute them."""
    cfg = _config(files, train, **sections)
    dataset = fingerprint(paths.dataset_identity(cfg))
    caches = {backend: fingerprint(paths.refscores_identity(cfg, dataset, backend))
              for backend in ("transformers", "vllm")}
    # the cache is not scored: the run names it by its folder's name, its fingerprint
    cache_dir = paths.refscores_dir(cfg.storage, caches["transformers"]) if cfg.train.needs_reference() else None
    run = locate.run_dir_for(cfg, dataset, cache_dir)
    return {"dataset": dataset, "cache": caches["transformers"], "cache_vllm": caches["vllm"], "run": run.fingerprint,
            "run_dir": run.path.name}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_run_fingerprints_are_pinned(case, files):
    assert fingerprints(files, TRAIN_CASES[case]) == PINS[case]


@pytest.mark.parametrize("case", sorted(SECTION_CASES := {
    "prompt kept from its start": {"tokenize": {"max_length": 96, "max_prompt_length": 32,
                                                    "truncation_mode": "keep_start"}},
    "no per-token values, 512-row shards": {"score": {"store_token_logps": False, "shard_rows": 512}},
    "model bfloat16": {"model": {"dtype": "bfloat16"}},
    "explicit columns": {"data": {"prompt_column": "prompt", "chosen_column": "chosen",
                                  "rejected_column": "rejected", "eval_fraction": 0.5}},
}))
def test_dataset_and_cache_fingerprints_are_pinned(case, files):
    sections = {key: dict(value) for key, value in SECTION_CASES[case].items()}
    if "model" in sections:
        sections["model"]["path"] = str(files["model"])
    if "data" in sections:
        sections["data"]["path"] = str(files["data"])
    assert fingerprints(files, {}, **sections) == PINS[case]


def test_the_pins_differ_where_the_inputs_do():
    """The table itself: what changes a weight changes the run's fingerprint, what does not (the
    run's name, how the effective batch is split over processes) does not."""
    runs = {case: PINS[case]["run"] for case in TRAIN_CASES}
    assert runs["named run"] == runs["default"] and PINS["named run"]["run_dir"] == "my-run"
    # the default effective batch is 8 pairs (8 x 1 on one process)
    assert runs["2 processes x 2 x 2"] == runs["1 process x 8 (same effective batch)"] == runs["default"]
    assert len(set(runs.values())) == len(TRAIN_CASES) - 3
    datasets = {case: PINS[case]["dataset"] for case in SECTION_CASES}
    assert datasets["no per-token values, 512-row shards"] == datasets["model bfloat16"] == PINS["default"]["dataset"]
    assert PINS["no per-token values, 512-row shards"]["cache"] != PINS["default"]["cache"] != PINS["model bfloat16"]["cache"]
    assert datasets["prompt kept from its start"] != PINS["default"]["dataset"] != datasets["explicit columns"]


DEMO_PINS = {"dataset": "d728771c2356947a33f72125d2e447f6f67491d61d8afcdec7fe98e87a28e99b",
             "cache": "ea491f7e8bc572f029b57b77835e28ca2efb3ff308138ac60a47bb258a898d25", "run": "dpo-8994397ecc15"}


def test_the_demo_stages_name_their_outputs_as_pinned(prepared_demo):
    """End to end: the demo (built from seeded random weights and a trained tokenizer, the same
    bytes on every machine with the locked packages), prepared and scored by the stages, and the
    folder its default run goes to."""
    cfg = prepared_demo({})
    dataset = locate.find_dataset(cfg)
    cache = locate.find_refscores(cfg, dataset.name)
    run = locate.run_dir_for(cfg, dataset.name, cache).path
    assert {"dataset": dataset.name, "cache": cache.name, "run": run.name} == DEMO_PINS
