# Two commands on a fresh machine:  make demo   |   make test
# Both create (or reuse) .venv and install every package at the version of constraints.txt
# (what the tests ran with). torch comes first so pip keeps the build you chose: by default
# the CPU build, from PyTorch's CPU index (its 2.13.0+cpu sorts above PyPI's 2.13.0, which
# on Linux is the multi-GB CUDA build; macOS gets PyPI's CPU wheel). On a GPU machine:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cu128 install
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS := constraints.txt
TORCH_VERSION := $(shell sed -n 's/^torch==//p' $(CONSTRAINTS))
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# --no-deps: only torch is looked up on PyTorch's index; its dependencies come with the
# package's, from PyPI, in the next step
TORCH_SPEC ?= torch==$(TORCH_VERSION) --no-deps --extra-index-url $(TORCH_INDEX)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wr-train-installed

.PHONY: demo test bench install constraints clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) $(TORCH_SPEC)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wr-train demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -x -q --durations=30 tests

bench: $(STAMP)
	$(PY) bench/preprocess.py
	$(PY) bench/pretrain_throughput.py

# constraints.txt from the venv (after a dependency change, once `make test` passes);
# its comment lines are kept, torch's local build tag (+cpu) is dropped.
constraints:
	{ sed -n '/^#/p' $(CONSTRAINTS); $(PY) -m pip freeze --exclude-editable \
	  | sed -E 's/^(torch==[0-9.]+)\+[A-Za-z0-9.]+$$/\1/' | LC_ALL=C sort -f; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf demo_out .pytest_cache
