"""The fingerprints of datasets, reference caches and runs, pinned.

A fingerprint names a stage's output folder, and a stage skips its work when the folder for the
same inputs exists: a fingerprint that changes with a refactoring makes every user's prepared
datasets, scored caches and runs invisible (all recomputed, the runs not resumed). These values
were computed before issue 21 moved code between modules and kept through issue 29's reshape; they
may change only with a schema version (paths.*_SCHEMA_VERSION), on purpose: the dataset schema 3
(pairs identical after truncation rejected) changed every dataset fingerprint, and with it the
caches' and runs' that name their dataset.

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
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "2c3d434049bf4311476204ad7c40acfd9e7d4f18d5252422b7d557fafb651bd0",
        "cache_vllm": "2725bc7f69f6c054acc853f375a9a7a53ef37bd7c07de90a453e4c5c906ff4cc",
        "run": "ec55e7e6be568279a47610a60d09b803ae749c1bfb36f6cd9668833461a2e01b",
        "run_dir": "dpo-ec55e7e6be56",
    },
    "sigmoid+sft mixture": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "2c3d434049bf4311476204ad7c40acfd9e7d4f18d5252422b7d557fafb651bd0",
        "cache_vllm": "2725bc7f69f6c054acc853f375a9a7a53ef37bd7c07de90a453e4c5c906ff4cc",
        "run": "d57e9d4bbddfdac50f22f413922c307095d7128d135923a985abb03c72d0e82e",
        "run_dir": "dpo-d57e9d4bbddf",
    },
    "ipo, beta 0.3, cosine": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "2c3d434049bf4311476204ad7c40acfd9e7d4f18d5252422b7d557fafb651bd0",
        "cache_vllm": "2725bc7f69f6c054acc853f375a9a7a53ef37bd7c07de90a453e4c5c906ff4cc",
        "run": "c8077bcaa62b4a198e359c9ee831290254e3b829c1f399cfab7ca8a689774594",
        "run_dir": "dpo-c8077bcaa62b",
    },
    "lora": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "2c3d434049bf4311476204ad7c40acfd9e7d4f18d5252422b7d557fafb651bd0",
        "cache_vllm": "2725bc7f69f6c054acc853f375a9a7a53ef37bd7c07de90a453e4c5c906ff4cc",
        "run": "6ca5d9466c69f7118e499523b0d60756a3a9c7f13b811a7f63d74c4916d87364",
        "run_dir": "dpo-6ca5d9466c69",
    },
    "simpo (reference-free)": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "2c3d434049bf4311476204ad7c40acfd9e7d4f18d5252422b7d557fafb651bd0",
        "cache_vllm": "2725bc7f69f6c054acc853f375a9a7a53ef37bd7c07de90a453e4c5c906ff4cc",
        "run": "bf4bac823b88e560bd3f5ec5a7995ec571c3f75f033f5a9d75e97a50810a8104",
        "run_dir": "dpo-bf4bac823b88",
    },
    "bf16-mixed": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "2c3d434049bf4311476204ad7c40acfd9e7d4f18d5252422b7d557fafb651bd0",
        "cache_vllm": "2725bc7f69f6c054acc853f375a9a7a53ef37bd7c07de90a453e4c5c906ff4cc",
        "run": "0c730de2b348e16b4916601f2b632992b5e5f03b3ccfa08215aec4fd7084fe14",
        "run_dir": "dpo-0c730de2b348",
    },
    "ld, wpo, rpo, cut": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "2c3d434049bf4311476204ad7c40acfd9e7d4f18d5252422b7d557fafb651bd0",
        "cache_vllm": "2725bc7f69f6c054acc853f375a9a7a53ef37bd7c07de90a453e4c5c906ff4cc",
        "run": "85938f516956d366354b1ea0f9728f182d7c8144387f004eb19cfe8bb8a4407b",
        "run_dir": "dpo-85938f516956",
    },
    "2 processes x 2 x 2": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "2c3d434049bf4311476204ad7c40acfd9e7d4f18d5252422b7d557fafb651bd0",
        "cache_vllm": "2725bc7f69f6c054acc853f375a9a7a53ef37bd7c07de90a453e4c5c906ff4cc",
        "run": "ec55e7e6be568279a47610a60d09b803ae749c1bfb36f6cd9668833461a2e01b",
        "run_dir": "dpo-ec55e7e6be56",
    },
    "1 process x 8 (same effective batch)": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "2c3d434049bf4311476204ad7c40acfd9e7d4f18d5252422b7d557fafb651bd0",
        "cache_vllm": "2725bc7f69f6c054acc853f375a9a7a53ef37bd7c07de90a453e4c5c906ff4cc",
        "run": "ec55e7e6be568279a47610a60d09b803ae749c1bfb36f6cd9668833461a2e01b",
        "run_dir": "dpo-ec55e7e6be56",
    },
    "named run": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "2c3d434049bf4311476204ad7c40acfd9e7d4f18d5252422b7d557fafb651bd0",
        "cache_vllm": "2725bc7f69f6c054acc853f375a9a7a53ef37bd7c07de90a453e4c5c906ff4cc",
        "run": "ec55e7e6be568279a47610a60d09b803ae749c1bfb36f6cd9668833461a2e01b",
        "run_dir": "my-run",
    },
    "prompt kept from its start": {
        "dataset": "2af5cf54e8d5f9d237d9c837c7582f55f273665a95bdea4010b6e07d9a6d5193",
        "cache": "2abdb3259f9fa31812e9f0166110de46d294b3abc67b394aa656173bc73e390d",
        "cache_vllm": "4b38962b47594a0620a2dbeaa47a7ed3e5363b3d7f92e3bdd0374b2bb594a98a",
        "run": "27eb12b53bfc10f1359b16e5b69f7cb7db1b30bb195d4cb3245427d3f4db8d3b",
        "run_dir": "dpo-27eb12b53bfc",
    },
    "no per-token values, 512-row shards": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "f906f4a71d3496bad54d32d5b27681532c784742ec9eff448d27fd28697917f8",
        "cache_vllm": "6d5f7c217bfff5db03a038763ad4fd5c169f76ba44c5f6df953d3da0621677b6",
        "run": "834dd338633dd05d05c6911588d54fc4fb2062eb68465e0954b97d63375f9e50",
        "run_dir": "dpo-834dd338633d",
    },
    "model bfloat16": {
        "dataset": "627b1a86ff8ec2fe58e1c146b2d4f95cba2fd69ea7917a42c78c9b2d48391ba0",
        "cache": "4fc342ff994178fdf4deb5e9a32236e9f474d95e5b08ae9b693ce84313cbcb6b",
        "cache_vllm": "4aac84930faaf801d944958ef4d419b10742611199204351ba327f02570ee38b",
        "run": "45252039932c68da550326fb3be573015d04415d6826e2b9bd80b7c47870b3f3",
        "run_dir": "dpo-45252039932c",
    },
    "explicit columns": {
        "dataset": "0bb08aafb8899a686f3561456db17c9f3eca9533b3bc8c9547cf398b4797b015",
        "cache": "1ac19c8377a25e4668871d86d9350114594301c450062615faae47255f0a372f",
        "cache_vllm": "a06d681450f475541e8f041e12d7c2fe72d4aaf0f0497e4b88d2bf2805f4a208",
        "run": "9d2fc74abc5a395961d3997e3a83fdf3999322abf0aba2b7814130e9a7d1c402",
        "run_dir": "dpo-9d2fc74abc5a",
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


DEMO_PINS = {"dataset": "b8680a5bba69789255b0475e2706ea73c2ecaf9e26710de21d85b1ec50725378",
             "cache": "4123a66024d97498626f1a97cdd6531277092b17b2064b0d1f9cebb50dc6524b", "run": "dpo-3353f07e192d"}


def test_the_demo_stages_name_their_outputs_as_pinned(prepared_demo):
    """End to end: the demo (built from seeded random weights and a trained tokenizer, the same
    bytes on every machine with the locked packages), prepared and scored by the stages, and the
    folder its default run goes to."""
    cfg = prepared_demo({})
    dataset = locate.find_dataset(cfg)
    cache = locate.find_refscores(cfg, dataset.name)
    run = locate.run_dir_for(cfg, dataset.name, cache).path
    assert {"dataset": dataset.name, "cache": cache.name, "run": run.name} == DEMO_PINS
