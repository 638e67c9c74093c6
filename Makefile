# Idempotent developer entry points. `make test` installs everything it needs into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch==2.13.0 first: the CPU wheel lies on disk; any looser spec would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

test: setup
	$(BIN)/python -m pytest -q --durations=25 tests

lint: setup
	$(BIN)/ruff check pipeline actors kernels jobs tests

demo: setup
	bash infra/local/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache
