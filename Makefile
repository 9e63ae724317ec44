# The two commands a newcomer runs: `make demo` and `make test`. Each creates the virtual
# environment and installs fusedskip (editable) with what it needs on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test check bench clean

$(VENV)/.installed-%: setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$*]"
	@touch $@

demo: $(VENV)/.installed-train
	$(VENV)/bin/fusedskip demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadfile tests

check: $(VENV)/.installed-train
	$(VENV)/bin/fusedskip check

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
