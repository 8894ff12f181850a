# make demo  - run the main job (creates .venv, installs what it needs)
# make test  - run the test suite (kernels in the Triton interpreter when there is no CUDA GPU)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Without CUDA, pin the CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# Kernels run in Triton's interpreter where torch sees no CUDA device (evaluated when a recipe runs).
INTERPRET = $$($(PY) -c 'import torch; print("" if torch.cuda.is_available() else "1")')

.PHONY: demo test clean

demo: $(VENV)/.installed-serve
	TRITON_INTERPRET=$(INTERPRET) $(VENV)/bin/autoglm-fast demo

test: $(VENV)/.installed-test
	TRITON_INTERPRET=$(INTERPRET) $(VENV)/bin/pytest

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	@if [ -z "$(HAS_CUDA)" ]; then $(PY) -m pip install -q torch==2.13.0; fi
	@touch $@

$(VENV)/.installed-%: setup.py $(VENV)/.torch
	$(PY) -m pip install -q -e '.[$*]'
	@touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
