# Two entry points for a fresh machine: `make demo` and `make test`. Each makes .venv and installs first.
VENV ?= .venv
PY := $(VENV)/bin/python
PARITY := $(VENV)/bin/parity
# torch 2.13.0 is the CPU build on this workplace's disk; other versions pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[torch,jax,hub,test]'
	touch $@

# The keras extra (keras-hub, the third outside reference; tensorflow comes with it, ~2 GB) only for the tests.
$(VENV)/.installed-keras: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[keras]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	bash golden/demo.sh $(PARITY)

# The same result however it is started (a terminal, `nohup make test &`, `timeout`, a CI runner): the signal tests
# start their children with the dispositions they rely on (tests/signal_child.py) while pytest itself keeps what it
# inherited (a `nohup` run still survives a hangup), and stdin is /dev/null, so no child can stop on reading a
# terminal it does not own (`timeout` runs its command in a background process group).
# Two workers (pytest-xdist), a test file per worker (`--dist loadfile`: a file's module fixtures are built once):
# the suite's ~1,050 tests take ~16 min in one process on a 2-core machine. Two, not `-n auto`: each worker holds
# torch, jax and transformers (~3-4 GB), so one per core of a large machine could run out of memory.
test: $(VENV)/.installed-keras
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests </dev/null

# ruff lints and checks the formatting of everything (configured in pyproject.toml); .ci/run calls it before the tests.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

.PHONY: install demo test lint
