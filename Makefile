# Two commands on a fresh machine:  make demo   |   make test
# Both create (or reuse) .venv. torch comes first so pip keeps the build you chose:
# here the CPU wheel (TORCH_SPEC); on a GPU machine set TORCH_SPEC to your CUDA build,
# e.g.  make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" demo
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wr-train-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wr-train demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -x -q tests

bench: $(STAMP)
	$(PY) bench/preprocess.py
	$(PY) bench/pretrain_throughput.py

clean:
	rm -rf demo_out .pytest_cache
