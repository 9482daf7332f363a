# Two commands do everything on a fresh machine:
#   make run DIR=./my-images    set up, index the folder, watch it, and serve search (MCP + HTTP)
#   make test                   set up, lint, type-check, and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DIR    ?= ./images
PYTEST_ARGS ?=

.PHONY: setup run demo test lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install 'torch==2.14.1' 'torchvision==0.29.1'
	$(BIN)/pip install -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/clipdex run $(DIR)

# Offline: generated images and the bundled shapes model (knows only shapes and colours).
demo: setup
	$(BIN)/clipdex demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
