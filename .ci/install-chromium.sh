#!/usr/bin/env bash
# Debian's Chromium for the real-browser tests (Playwright drives /usr/bin/chromium; no browser
# download). Idempotent; a failure is reported and the browser tests then fail under CI.
set -u
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "== installing chromium (Debian package)"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
  echo "warning: could not install chromium; browser tests will fail under CI" >&2
  exit 1
fi
