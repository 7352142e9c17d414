# balsync: `make` alone lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := .demo
PYTEST_ARGS ?=
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ENGINE ?= docker
IMAGE ?= balsync:$(VERSION)

.PHONY: help install demo demo-stop test test-faults lint format bench image clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/balsync: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/balsync ## create .venv with balsync and its development tools

demo: install ## start local servers in .demo/, seed 100 000 balances, init-db, sync -v, show the result
	@$(BIN)/python -m tests.support.devservers start $(DEMO) > /dev/null
	@set -a; source $(DEMO)/env; BALSYNC_KEY_PREFIX=demo:balance:; set +a; \
	$(BIN)/python -m tests.support.demo seed 100000 && \
	$(BIN)/balsync init-db && \
	{ $(BIN)/balsync sync --verbose --force; code=$$?; [ $$code -le 1 ]; } && \
	$(BIN)/python -m tests.support.demo show && \
	echo && echo "Servers keep running in $(DEMO)/ (URLs in $(DEMO)/env). Try:" && \
	echo "  source $(DEMO)/env && BALSYNC_KEY_PREFIX=demo:balance: $(BIN)/balsync sync --dry-run" && \
	echo "Stop them with: make demo-stop"

demo-stop: ## stop the demo's servers
	@$(BIN)/python -m tests.support.devservers stop $(DEMO)

test: install ## run the test suite with branch coverage (real servers: BALSYNC_TEST_* URLs, else embedded ones)
	$(BIN)/pytest -m "not faults" --cov --cov-report=term --durations=15 $(PYTEST_ARGS)

test-faults: install ## run the fault-injection suite alone (starts its own servers)
	$(BIN)/pytest -m faults $(PYTEST_ARGS)

# make bench N=100000 REPEAT=1 RSS5N=1; servers: BALSYNC_BENCH_DATABASE_URL (admin), BALSYNC_BENCH_REDIS_URL
N ?= 1000000
REPEAT ?= 3
RSS5N ?= 0
BENCH_ARGS ?= --n $(N) --repeat $(REPEAT) $(if $(filter 1,$(RSS5N)),--rss-5n)
bench: install ## sync vs its floor on N scratch keys (N=1000000, RSS5N=1 adds 5N); bench/results.md
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: install ## ruff and mypy --strict
	$(BIN)/ruff check balance_sync tests bench
	$(BIN)/ruff format --check balance_sync tests bench
	$(BIN)/mypy

format: install ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format balance_sync tests bench
	$(BIN)/ruff check --fix balance_sync tests bench

image: ## build the container image of deploy/kubernetes (IMAGE=balsync:VERSION, ENGINE=docker|podman)
	$(ENGINE) build -t $(IMAGE) .

clean: ## remove the virtualenv, caches and the demo's data (stop the demo first)
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
