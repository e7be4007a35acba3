# Two commands set everything up on a fresh machine:
#   make demo   install, then run `dd detect` and `dd eval-detector` on the bundled examples
#   make test   install (and a Chromium for the page tests), then ruff check,
#               ruff format --check and the whole test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.dd-installed
# torch is pinned to the CPU build that lies on this disk; a user with a GPU installs
# `pip install -e .` over the torch they already have.
TORCH ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Sleeping, not spinning, OpenMP threads: a busy 2-core machine otherwise crawls.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install browser demo test lint format clean

$(STAMP): pyproject.toml setup.py requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/dd detect examples/synth/images --out demo-out --overwrite
	$(BIN)/dd eval-detector examples/synth
	@echo "Open demo-out/index.html to see the contact sheet."

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The web-page tests drive a real Chromium: found on PATH, else installed (see the script).
browser:
	bash scripts/test-browser.sh

test: lint browser
	$(BIN)/python -m pytest -q

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf demo-out build *.egg-info .pytest_cache .ruff_cache
