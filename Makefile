# Thin aliases. The README's two commands: `make lab` and `make test` (as root).
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: install lab test unit netns lint bench golden clean

install: .install-stamp
.install-stamp: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

lab: install            ## the seed's walkthrough on network namespaces (root)
	$(BIN)/k8s-ext-connector lab

test: install lint      ## everything CI runs: lint, unit and namespace tiers
	$(BIN)/pytest

unit: install
	$(BIN)/pytest tests/unit

netns: install
	$(BIN)/pytest tests/netns

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

golden: install         ## rewrite golden files from the current code, then review the diff
	REGEN_GOLDEN=1 $(BIN)/pytest tests/unit -q -k golden

bench: install          ## data-plane benchmark (root); writes bench/results/dataplane.md
	$(BIN)/python bench/dataplane.py

clean:
	rm -rf $(VENV) .install-stamp .mypy_cache .ruff_cache .pytest_cache
