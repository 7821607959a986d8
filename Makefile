# kvsched: `make serve` runs the service, `make test` runs the checks and the suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP     := $(VENV)/.installed-dev
ARGS ?= --listen 127.0.0.1:50051 --data-dir ./kvsched-data
PYTEST_ARGS ?=
# Packages held to `mypy --strict`.
MYPY_PATHS := scheduler_service kvsched scripts loadtest

.PHONY: serve test check lint typecheck proto bench venv clean system-deps

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e .
	touch $@

$(DEV_STAMP): pyproject.toml $(RUNTIME_STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(DEV_STAMP)

## serve: run the scheduler with its embedded default (in-memory state + SQLite journal)
serve: $(RUNTIME_STAMP)
	$(BIN)/kvsched serve $(ARGS)

## test: lint, type-check, then the whole suite (installs redis-server for the HA tests)
test: $(DEV_STAMP) check system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# System packages some tests need; installed with apt-get when missing and possible.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server missing and cannot be installed here; HA tests will skip"; fi; }

check: lint typecheck

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy $(MYPY_PATHS)
	cd clients/python && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p kvsched_client

## proto: regenerate the committed Python stubs from proto/
proto: $(DEV_STAMP)
	$(BIN)/python scripts/gen_proto.py

## bench: round-trip figures on loopback (see bench/RESULTS.md)
bench: $(DEV_STAMP)
	$(BIN)/python bench/rpc_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
