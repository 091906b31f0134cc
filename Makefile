# Two entry points for a fresh machine (Python 3.11+ with pip): `make demo` and `make test`.
# Each creates the virtualenv in .venv on first use and installs from constraints.txt, the
# pinned versions the documented numbers were measured with (`make lock` refreshes it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALL := $(PY) -m pip install -q -c constraints.txt
WORKDIR ?= workdirs/demo
LOCK_VENV := .venv-lock
LOCK_PY := $(LOCK_VENV)/bin/python
export PLATFORM := import platform as p; print(p.python_version(), p.system(), p.machine())

$(PY):
	$(PYTHON) -m venv $(VENV)

# The runtime package only (what the demo and the training / figure commands need).
$(VENV)/.installed-runtime: setup.py constraints.txt | $(PY)
	$(INSTALL) --upgrade pip
	$(INSTALL) -e .
	touch $@

# Plus the test extras (pytest, CPU torch and transformers as the parity references).
$(VENV)/.installed-test: $(VENV)/.installed-runtime
	$(INSTALL) -e ".[test]"
	touch $@

.PHONY: install sandbox demo test ablation lock clean
install: $(VENV)/.installed-runtime

# bubblewrap, the code reward's sandbox (docs/code_reward.md); a no-op when bwrap is on PATH.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  echo "installing bubblewrap (apt-get install -y bubblewrap)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bubblewrap; }

demo: $(VENV)/.installed-runtime  ## SFT warm start + CISPO RL on the tiny model (configs/demo.py)
	$(PY) -m experiments.train --config=configs/demo.py --workdir=$(WORKDIR)
	$(PY) -m experiments.check_demo --workdir=$(WORKDIR)

test: $(VENV)/.installed-test sandbox  ## the CPU test suite (GPU tests are skipped without a GPU)
	$(PY) -m pytest -q -n 2 --dist=loadfile tests

# One RL objective (configs/rl/<OBJECTIVE>_arithmetic.py) from the shared SFT start;
# the first call trains that start (configs/sft/arithmetic.py), later ones find it complete.
OBJECTIVE ?= cispo
ablation: $(VENV)/.installed-runtime
	$(PY) -m experiments.train --config=configs/sft/arithmetic.py --workdir=workdirs/sft_arithmetic
	$(PY) -m experiments.train --config=configs/rl/$(OBJECTIVE)_arithmetic.py \
	    --workdir=workdirs/$(OBJECTIVE)

# Resolves setup.py's requirements (with every extra) afresh in a scratch virtualenv and writes
# the versions it got to constraints.txt; run the tests and the demo after it, and commit.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_PY) -m pip install -q --upgrade pip
	$(LOCK_PY) -m pip install -q -e ".[test,tokenizers]"
	{ echo "# Pinned versions for make demo / make test (pip install -c constraints.txt)."; \
	  echo "# Written by make lock on Python $$($(LOCK_PY) -c "$$PLATFORM"); do not edit."; \
	  $(LOCK_PY) -m pip --version | awk '{print "pip==" $$2}'; \
	  $(LOCK_PY) -m pip freeze --exclude-editable | sed 's/+[A-Za-z0-9.]*$$//'; \
	} > constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) .jax_cache workdirs
