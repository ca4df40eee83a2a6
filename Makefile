# reddino: every target creates/updates the virtual environment first when needed.
# The environment is keyed by requirements.lock: uv installs from its content-addressed cache
# (hardlinks on the same filesystem), so a fresh clone on a warm machine installs in seconds.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
LOCK_HASH := $(shell sha256sum $(LOCK) 2>/dev/null | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
UV_VERSION := 0.13.9
ARGS ?=
TEST_ARGS ?=
export REDDINO_DATA_ROOT ?= $(abspath ../shared/datasets)
NOW := $(shell date +%Y-%m-%d_%H-%M-%S)
ABLATIONS_DIR ?= multirun/ablations/$(NOW)
FIGURES_DIR ?= figures

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): $(LOCK) pyproject.toml
	@echo ">> creating $(VENV) from $(LOCK) (first use only)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip sync -q --python $(BIN)/python $(LOCK)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create the virtual environment and install reddino (automatic for every target)

lock: ## re-resolve requirements.lock from pyproject.toml (needs network access to PyPI)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o $(LOCK)

pretrain: $(STAMP) ## self-supervised pretraining (embedded default: synthetic smears, tiny ViT, CPU); ARGS="experiment=reddino_s ..."
	$(BIN)/reddino-pretrain $(ARGS)

prepare: $(STAMP) ## real datasets under REDDINO_DATA_ROOT -> patches, cells, manifests + report; ARGS="..."
	$(BIN)/reddino-prepare $(ARGS)

pack: $(STAMP) ## prepared manifests + their smears -> a relocatable JPEG copy; ARGS="out=<dir>/prepared quality=60"
	$(BIN)/reddino-pack $(ARGS)

eval: $(STAMP) ## linear probe + k-NN + batch effects of a backbone vs baselines; ARGS="weights=<export dir> data=real eval=kfold"
	$(BIN)/reddino-eval $(ARGS)

ablations: $(STAMP) ## the paper's ablation grid as one multirun, then summary.csv/.md + Figure 2 in ABLATIONS_DIR; ARGS="experiment=ablations_reddino_s"
	$(BIN)/reddino-ablations --multirun experiment=ablations hydra.sweep.dir=$(ABLATIONS_DIR) $(ARGS); \
	status=$$?; $(BIN)/reddino-ablations-summary $(ABLATIONS_DIR) && exit $$status

figures: $(STAMP) ## execute notebooks/*.ipynb (newest runs, or REDDINO_RUN_DIR / REDDINO_ABLATIONS_DIR) -> PNGs in FIGURES_DIR
	REDDINO_FIGURES_DIR=$(FIGURES_DIR) $(BIN)/python -m reddino.viz.execute notebooks/*.ipynb

test: $(STAMP) ## run the test suite (what .ci/run calls)
	$(BIN)/python -m pytest $(TEST_ARGS)

test-fast: $(STAMP) ## the inner loop: every test not marked slow (no end-to-end runs)
	$(BIN)/python -m pytest -m "not slow" $(TEST_ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP) ## ruff autofix and format
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache outputs multirun

.PHONY: help install lock eval prepare pack pretrain ablations figures test test-fast lint format clean
