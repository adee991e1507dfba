# The two commands a newcomer runs: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)

.PHONY: demo console test lint unit bench chaos clean system-deps venv lock

# A virtualenv with a working pip; a half-built one (no pip, e.g. python3-venv missing) is rebuilt.
venv:
	@scripts/ensure-venv.sh "$(PYTHON)" "$(VENV)"

# The runtime dependencies exactly as the image gets them (hashes checked), then the dev tools.
$(STAMP): pyproject.toml requirements.lock
	@scripts/ensure-venv.sh "$(PYTHON)" "$(VENV)"
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --require-hashes -r requirements.lock
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@rm -f $(VENV)/.installed-* && touch $@

# Regenerate requirements.lock from pyproject.toml (runtime and build-system requirements, every
# platform, Python 3.11 and later); needs the package index.
lock: $(STAMP)
	$(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'], sep='\n')" \
	  | $(BIN)/uv pip compile pyproject.toml - --universal --python-version 3.11 --generate-hashes \
	      --custom-compile-command "make lock" --quiet -o requirements.lock

system-deps:
	@scripts/install-system-deps.sh

demo: $(STAMP) system-deps
	$(BIN)/python -m scripts.demo

# The operator console on throwaway servers with demo data, until Ctrl-C.
console: $(STAMP) system-deps
	$(BIN)/python -m scripts.console

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest

# The unit tests alone: no server, a few seconds.
unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

bench: $(STAMP) system-deps
	$(BIN)/python -m bench

# The chaos run, then fault injection on replicated brokers (Redis with Sentinel, a three-node
# RabbitMQ cluster in network namespaces: needs root).
chaos: $(STAMP) system-deps
	$(BIN)/python -m bench.chaos
	$(BIN)/python -m bench.failover_redis
	$(BIN)/python -m bench.failover_rabbit

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
