#!/bin/sh
# Install Debian's docker-compose (Compose v1.29, Python) when it is missing, so that
# tests/test_deploy_files.py can validate docker-compose.yml with the real Compose
# parser. No Docker engine is needed for `docker-compose config`.
#
# Idempotent, and never fails the CI job: without docker-compose those checks skip
# (with a reason) and the PyYAML-based checks still run.
set -u

if command -v docker-compose >/dev/null 2>&1; then
    echo "docker-compose already installed: $(docker-compose version --short 2>/dev/null || echo '?')"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "WARNING: not root and no sudo; cannot install docker-compose (tests will skip)" >&2
        exit 0
    fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "WARNING: apt-get not found; cannot install docker-compose (tests will skip)" >&2
    exit 0
fi

if $SUDO apt-get update -qq \
    && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; then
    echo "installed: $(docker-compose version --short 2>/dev/null || echo 'docker-compose (version unknown)')"
else
    echo "WARNING: installing docker-compose failed; compose checks will skip" >&2
fi
exit 0
