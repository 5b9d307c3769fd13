#!/usr/bin/env bash
# CI's image step (.ci/run, after the suite), on a fresh Debian 12 machine as root, where no
# registry of images is reachable (Debian's packages and PyPI are):
#   1. Debian's docker.io and debootstrap; dockerd started by hand (no systemd), stopped at exit;
#   2. the base image, Debian 12 with Python 3.11, made by debootstrap and `docker import`;
#   3. torch's +cpu wheel, which PyPI lacks, from this machine's pip into docker/wheels/; the
#      build's pip takes the rest from PyPI, trusting this machine's CA bundle (a build secret);
#   4. hadolint on both Dockerfiles;
#   5. `make docker-test`: build the CPU image on that base, run it with the tiny model, ask it
#      through a published loopback port with the bundled client, `docker stop` it (tests/docker).
# Prints each step's seconds: the minutes this adds to CI.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${STREAMCHAT_DOCKER_BASE:-local/debian-python:12}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Debian's client: BuildKit built in (a newer client elsewhere on PATH may need buildx).
DOCKER=${DOCKER:-/usr/bin/docker}
STATE=$(mktemp -d /tmp/streamchat-docker-ci.XXXXXX)

timed() {
    local started=$SECONDS
    "$@"
    echo "docker/ci.sh: $* took $((SECONDS - started)) s"
}

packages() {
    local missing=""
    [ -x /usr/sbin/dockerd ] || missing="$missing docker.io"
    command -v debootstrap >/dev/null || missing="$missing debootstrap"
    if [ -n "$missing" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
}

daemon() {
    if "$DOCKER" info >/dev/null 2>&1; then
        return 0 # one is running already: use it, leave it running
    fi
    dockerd --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 &
    echo $! >"$STATE/started"
    for _ in $(seq 120); do
        if "$DOCKER" info >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    cat "$STATE/dockerd.log" >&2
    return 1
}

stop_daemon() {
    if [ -f "$STATE/started" ]; then
        kill "$(cat "$STATE/started")" 2>/dev/null || true
        wait "$(cat "$STATE/started")" 2>/dev/null || true
    fi
    rm -rf "$STATE"
}
trap stop_daemon EXIT

base() {
    if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
        return 0
    fi
    debootstrap --variant=minbase --include=python3-minimal,python3-venv \
        bookworm "$STATE/root" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -20 "$STATE/debootstrap.log" >&2; return 1; }
    tar -C "$STATE/root" -c . | "$DOCKER" import - "$BASE" >/dev/null
    rm -rf "$STATE/root"
}

torch_wheel() {
    local torch
    torch=$("${VENV:-.venv}"/bin/python docker/requirements.py cpu | grep '^torch==')
    "${VENV:-.venv}"/bin/pip download --quiet --no-deps --dest docker/wheels "$torch"
}

total=$SECONDS
timed packages
timed daemon
timed base
timed torch_wheel
timed make docker-lint
timed make docker-test DOCKER="$DOCKER" DOCKER_BASE="$BASE" TORCH_INDEX_URL=
echo "docker/ci.sh: the image step took $((SECONDS - total)) s"
