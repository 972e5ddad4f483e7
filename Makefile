# execbroker: `make up` runs a one-node broker, `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export EXECBROKER_DIR ?= /var/lib/execbroker

.PHONY: up test test-unit bench bench-quick clean deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

deps:
	sh deploy/system-deps.sh

up: deps $(VENV)/.installed
	$(BIN)/execbroker up

test: $(VENV)/.installed
	sh deploy/system-deps.sh --test
	$(BIN)/pytest

test-unit: $(VENV)/.installed
	$(BIN)/pytest tests -m "not broker"

bench: $(VENV)/.installed
	sh deploy/system-deps.sh --test
	$(BIN)/python -m bench.run

bench-quick: $(VENV)/.installed
	sh deploy/system-deps.sh --test
	$(BIN)/python -m bench.run --quick

# the long fuzz run (tests/fuzz/): EXECBROKER_FUZZ_EXAMPLES per target (default 2000), EXECBROKER_FUZZ_SEED
.PHONY: fuzz
fuzz: $(VENV)/.installed
	sh deploy/system-deps.sh --test
	$(BIN)/python -m bench.run --only fuzz --no-profile

# 10,000 mixed execs (lxc exec, lxc exec -t, task; local and forwarded), 50 at a time, on a 2-node cluster of
# its own: fails on any hang, lost final event, wrong exit code, or agent fds/threads/children/RSS not flat.
.PHONY: soak
soak: $(VENV)/.installed
	sh deploy/system-deps.sh --test
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
