# The two commands a newcomer runs: `make demo` and `make test`. Each creates its virtual
# environment and installs fusedskip (editable) with what it needs on first use.
#
# `make test` installs the exact versions of requirements/ci-lock.txt (CI runs it: the same
# commit passes or fails the same way on any day). Other targets:
#   make test-device   the GPU machines' stack (Python 3.12, torch 2.11, triton 3.6,
#                      torchvision 0.26: requirements/device-lock.txt) in .venv-device, running
#                      every kernel of every op under TRITON_INTERPRET=1 plus the sm_90 compile check
#   make test-latest   the newest versions setup.py admits, in .venv-latest: finds drift on purpose
#   make lock          rewrite requirements/ci-lock.txt from a fresh resolution (then run make test)
#   make lint          ruff (ruff.toml)
VENV ?= .venv
PYTHON ?= python3
LOCK := requirements/ci-lock.txt
DEVICE_VENV ?= .venv-device
# The GPU machines run Python 3.12: the first python3.12 that runs (PATH, then pyenv's versions).
DEVICE_PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo $$p; break; }; done)
DEVICE_LOCK := requirements/device-lock.txt
LATEST_VENV ?= .venv-latest
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q -n 2 --dist loadfile
# The device-stack subset: every kernel of every op (each dtype, both layouts, fwd + bwd) and the
# sm_90 compile of every launched kernel variant.
DEVICE_TESTS := tests/test_kernel_matrix.py tests/test_gpu_compile.py

.PHONY: demo test test-device test-latest lint lock check bench clean

$(VENV)/.installed-%: setup.py $(LOCK) tools/make_venv.sh
	@tools/make_venv.sh $(VENV) $(PYTHON) $* $(LOCK)
	@touch $@

demo: $(VENV)/.installed-train
	$(VENV)/bin/fusedskip demo

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS) tests

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .

$(DEVICE_VENV)/.installed: setup.py $(DEVICE_LOCK) tools/make_venv.sh
	@tools/make_venv.sh $(DEVICE_VENV) "$(or $(DEVICE_PYTHON),python3.12)" device $(DEVICE_LOCK)
	@touch $@

test-device: $(DEVICE_VENV)/.installed
	$(DEVICE_VENV)/bin/python -c "import sys, torch, triton; print('device stack: Python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
	$(DEVICE_VENV)/bin/python -m pytest $(PYTEST_ARGS) $(DEVICE_TESTS)

$(LATEST_VENV)/.installed: setup.py tools/make_venv.sh
	@rm -rf $(LATEST_VENV)
	@tools/make_venv.sh $(LATEST_VENV) $(PYTHON) test
	@touch $@

test-latest: $(LATEST_VENV)/.installed
	$(LATEST_VENV)/bin/python -m pip list --disable-pip-version-check | grep -iE "^(torch|triton|torchvision) "
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS) tests

lock: $(LATEST_VENV)/.installed
	@{ sed -n '/^#/p' $(LOCK); $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable --disable-pip-version-check \
		| grep -v -e '^-e' -e '^fusedskip'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	@echo "rewrote $(LOCK); run 'make test' and commit it if it passes"

check: $(VENV)/.installed-train
	$(VENV)/bin/fusedskip check

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) $(DEVICE_VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .hypothesis
