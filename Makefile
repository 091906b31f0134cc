# Two entry points for a fresh machine (Python 3.11+ with pip): `make demo` and `make test`.
# Each creates the virtualenv in .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: install demo test clean
install: $(VENV)/.installed

demo: $(VENV)/.installed  ## SFT warm start + CISPO RL on the tiny model (configs/demo.py)
	$(PY) -m experiments.train --config=configs/demo.py --workdir=$(WORKDIR)

test: $(VENV)/.installed  ## the CPU test suite (GPU tests are skipped without a GPU)
	$(PY) -m pytest -q -n 2 --dist=loadfile tests

clean:
	rm -rf $(VENV) .jax_cache workdirs
