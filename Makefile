# Every target does its own setup, so a fresh clone on a fresh machine needs only
# `make demo` or `make test`. CI runs `make test` (see .ci/run).

UV_VERSION := 0.13.8
PYTHON ?= python3
UV := $(PYTHON) -m uv
VENV := .venv
NUDGE := $(VENV)/bin/nudge
SERVERS := bash infra/local/servers.sh

.PHONY: help venv up down status migrate topology setup demo test test-fast lint fmt bench clean

help:
	@echo "make demo   set everything up and run the main job end to end"
	@echo "make test   set everything up and run the whole suite (lint, types, tests)"
	@echo "make bench  set everything up and run the benchmarks"
	@echo "make up / make down   start / stop the local RabbitMQ and PostgreSQL"

$(VENV)/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --frozen --quiet --compile-bytecode
	@touch $@

venv: $(VENV)/.synced

up:
	$(SERVERS) up

down:
	$(SERVERS) down

status:
	$(SERVERS) status

migrate: venv up
	$(NUDGE) db upgrade

topology: venv up
	$(NUDGE) topology apply

# Bytecode for our own packages too: with PYTHONDONTWRITEBYTECODE set (as on our machines)
# every worker and CLI process would otherwise compile its imports again, ~1.5 s of CPU each.
setup: migrate topology
	@$(VENV)/bin/python -m compileall -q -j 0 producer shared workers bench tests >/dev/null

demo: setup
	$(NUDGE) demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup lint
	$(VENV)/bin/pytest

test-fast: setup
	$(VENV)/bin/pytest -x -q -m "not acceptance and not cluster and not failover"

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# `make bench [SCENARIO]`: the words after `bench` name the scenario, they are not targets.
ifeq (bench,$(firstword $(MAKECMDGOALS)))
  BENCH_ARGS := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
  $(eval $(BENCH_ARGS):;@:)
endif

bench: setup
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

clean: down
	rm -rf .local $(VENV)
