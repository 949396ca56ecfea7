#!/bin/sh
# Debian's caddy for tests/test_proxy.py, which runs config/Caddyfile in front of gunicorn.
# Idempotent: installs only when the binary is missing. The package's systemd unit is not
# started (no systemd in CI containers); the tests run caddy themselves on free ports.
# A failure is reported; tests/test_proxy.py then fails under CI (skips elsewhere).
set -u
if command -v caddy >/dev/null 2>&1; then
    exit 0
fi
echo "== installing caddy (Debian package)"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends caddy >/dev/null; }; then
    echo "warning: could not install caddy; tests/test_proxy.py will fail under CI" >&2
    exit 1
fi
