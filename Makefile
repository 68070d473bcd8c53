# Thin aliases. The README's two commands: `make lab` and `make test` (as root).
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: install lab test unit netns kube lint bench golden clean

install: .install-stamp
.install-stamp: pyproject.toml scripts/install.sh scripts/kube-binaries.sh
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

kube: install           ## the upstream control plane (binaries built by make install)
	$(BIN)/pytest tests/kube

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

golden: install         ## rewrite golden files from the current code, then review the diff
	REGEN_GOLDEN=1 $(BIN)/pytest tests/unit -q -k golden

bench: install          ## data-plane benchmark (root); writes bench/results/dataplane.md
	$(BIN)/python bench/dataplane.py

clean:
	rm -rf $(VENV) .install-stamp .mypy_cache .ruff_cache .pytest_cache

# ---- images and the kind e2e suite (need Docker) -------------------------------------------
.PHONY: images e2e
IMAGE_REPO ?= ghcr.io/k8s-ext-connector/k8s-ext-connector
IMAGE_TAG ?= $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' src/k8s_ext_connector/__init__.py)
DOCKER ?= docker
# One line and exit 1 when Docker cannot build or run containers here ($(1): what did not happen).
docker_usable = command -v $(DOCKER) >/dev/null 2>&1 \
	|| { echo "$@: FAILED: no '$(DOCKER)' CLI on PATH; $(1)" >&2; exit 1; }; \
	err="$$($(DOCKER) info 2>&1 >/dev/null)" \
	|| { echo "$@: FAILED: Docker is not usable here ($(DOCKER) info: $$(echo "$$err" | grep -m1 .)); $(1)" >&2; exit 1; }

images:                 ## the one image of every component: $(IMAGE_REPO):$(IMAGE_TAG)
	@$(call docker_usable,no image was built)
	$(DOCKER) build --build-arg VERSION=$(IMAGE_TAG) \
	  --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	  -t $(IMAGE_REPO):$(IMAGE_TAG) .

e2e:                    ## kind cluster + chart + the seed's walkthrough (Docker); EXTCONN_E2E_KEEP=1 keeps it
	@$(call docker_usable,the kind e2e suite did NOT run)
	@$(MAKE) --no-print-directory install
	bash tests/e2e/install-kind.sh
	EXTCONN_E2E=1 $(BIN)/pytest tests/e2e -v
