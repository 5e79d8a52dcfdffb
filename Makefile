# filterd — set-up, run and test on Debian 12 (as root).
# `make run` and `make test` install everything they need themselves.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEB_PACKAGES := postfix clamav-daemon clamav redis-server rbldnsd libmilter-dev \
                python3-venv python3-dev gcc make
STAMP_DEB  := $(VENV)/.deb-stamp
STAMP_VENV := $(VENV)/.venv-stamp

.PHONY: run test deps venv lint typecheck bench bench-classifier bench-perf clean

run: venv
	$(BIN)/filterd serve

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

deps: $(STAMP_DEB)
$(STAMP_DEB):
	@if ! dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES); \
	fi
	@mkdir -p $(VENV) && touch $@

venv: $(STAMP_VENV)
$(STAMP_VENV): $(STAMP_DEB) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check filterd
	$(BIN)/mypy

bench-classifier: venv
	$(BIN)/python bench/classifier_bench.py

bench-perf: venv
	$(BIN)/python bench/perf_bench.py

bench: bench-classifier bench-perf

clean:
	rm -rf $(VENV) var build *.egg-info
