#!/bin/sh
# Debian's MariaDB server binaries for the SQL store's MySQL tests, which run mariadbd themselves
# in a temporary directory on a free port (chatkit_flask/testing/mariadb_server.py). Idempotent:
# installs only when mariadbd is missing. The package's service is never started: a policy-rc.d
# refuses every service start during the install (no systemd in CI containers either).
# A failure is reported; the MySQL tests then fail under CI (skip elsewhere).
set -u
if command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; then
    exit 0
fi
echo "== installing mariadb-server (Debian package; its service stays stopped)"
policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mariadb-server >/dev/null
status=$?
[ -n "$made_policy" ] && rm -f "$policy"
if [ "$status" -ne 0 ]; then
    echo "warning: could not install mariadb-server; the MySQL tests will fail under CI" >&2
    exit 1
fi
