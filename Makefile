# `make test` and `make figures` do all the set-up they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
RUNS   ?= runs

export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export PYTHONHASHSEED := 0
# Notebook outputs are checked by nbval: the same thread count everywhere keeps CPU reductions in the same order
# (`override`: a value already in the shell, e.g. a scheduler's OMP_NUM_THREADS=1, would otherwise win).
override export OMP_NUM_THREADS := 2
# ... and the same vector instruction set: on an AVX-512 machine PyTorch, oneDNN and MKL otherwise pick other kernels
# than on an AVX2 one and the last digits move (a SAGE search then diverges). Pinned to AVX2, an AVX-512 machine
# reproduces the committed outputs (checked 2026-12-04 on an AMD EPYC with AVX-512: notebook 04 failed unpinned, passed pinned).
override export ATEN_CPU_CAPABILITY := avx2
override export ONEDNN_MAX_CPU_ISA := AVX2
override export MKL_ENABLE_INSTRUCTIONS := AVX2

.PHONY: help install test unit nbval figures notebooks-update bench wheels clean

help:
	@echo "make test     - install into $(VENV) if needed, run pytest and the nbval notebook checks"
	@echo "make figures  - install if needed, run every numbered notebook headless (papermill), write figures/"
	@echo "make notebooks-update - re-execute the committed notebooks in place (after a change of numbers)"
	@echo "make bench    - install if needed, list benchmarks/bench.py's options (benchmarks/README.md)"
	@echo "make wheels   - download the wheels the lent GPU box lacks into .whl (carry it to the device call)"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[notebooks,dev]'
	touch $(STAMP)

test: unit nbval

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q

# An empty Hugging Face cache (as tests/conftest.py gives the unit tests): a user's cached weights never leak in.
nbval: $(STAMP)
	@if [ -z "$(NOTEBOOKS)" ]; then echo "nbval: no notebooks/NN_*.ipynb found" >&2; exit 1; fi
	@tmp=$$(mktemp -d) && T2I_RUNS_DIR=$$tmp HF_HOME=$$tmp/hf HF_HUB_CACHE=$$tmp/hf/hub \
	    $(BIN)/python -m pytest -q -p no:cacheprovider --nbval --nbval-current-env \
	    --nbval-sanitize-with tests/nbval_sanitize.cfg $(NOTEBOOKS); \
	  rc=$$?; rm -rf $$tmp; exit $$rc

figures: $(STAMP)
	mkdir -p $(RUNS) figures
	@for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb .ipynb); \
	  echo "== $$name"; \
	  $(BIN)/papermill --cwd notebooks $$nb $(RUNS)/$$name.ipynb \
	    -p OUTPUT_DIR $(abspath $(RUNS))/$$name -p FIGURES_DIR $(abspath figures) || exit 1; \
	done

notebooks-update: $(STAMP)
	@tmp=$$(mktemp -d); for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  T2I_RUNS_DIR=$$tmp $(BIN)/papermill --cwd notebooks $$nb $$nb || { rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --help

# What the lent GPU box lacks (benchmarks/README.md), for its Python 3.12: carry .whl (git-ignored) to the device call.
wheels:
	rm -rf .whl  # a second version of a wheel left from an older pin makes the device's pip install fail
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  diffusers==0.42.1 open_clip_torch==3.3.0 kornia==0.9.0 kornia_rs==0.2.0 ftfy==6.3.1 wcwidth==0.9.5
	@du -sh .whl

clean:
	rm -rf $(RUNS) .pytest_cache
