#!/usr/bin/env bash
# Shared set-up: a virtualenv with the pinned requirements, the redis-server binary and
# PostgreSQL's server binaries.
# Idempotent; sourced by .ci/run and bin/serve.
set -euo pipefail

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# Reinstall only when requirements.txt changed since the last install.
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing requirements.txt"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi

# The tests and the bench start their own redis-server on a free port: the binary is all they need.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

# The SQL store's tests start their own PostgreSQL cluster in a temporary directory: they need
# the server binaries (initdb, postgres), never a running service. No default cluster is made.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  echo "== installing PostgreSQL's server binaries"
  mkdir -p /etc/postgresql-common
  [ -f /etc/postgresql-common/createcluster.conf ] ||
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# For bin/serve only (the tests never use it): a Redis answering on 127.0.0.1:6379, started when
# none does.
local_redis_answers() {
  redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG
}

ensure_local_redis() {
  if local_redis_answers; then return 0; fi
  echo "== starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no
  for _ in $(seq 1 50); do local_redis_answers && return 0; sleep 0.1; done
  echo "Redis does not answer on 127.0.0.1:6379" >&2
  return 1
}
