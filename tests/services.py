"""Services the suite starts itself: its own ``redis-server`` (see ``redis_server`` in conftest),
its own PostgreSQL (``postgres_server``) and its own MariaDB (``mysql_server``).

Kept out of conftest.py because pytest imports that file as ``conftest`` while test modules import
``tests.conftest``: two module objects. Everything here is imported as ``tests.services`` only, so
the suite has one server, one port and one set of URLs.
"""

from __future__ import annotations

import os
from typing import TypeVar

import pytest

from chatkit_flask.testing.mariadb_server import MariaDBServer, MariaDBServerMissing
from chatkit_flask.testing.postgres_server import PostgresServer, PostgresServerMissing
from chatkit_flask.testing.redis_server import RedisServer, RedisServerMissing

# Started by the ``redis_server`` fixture on first use, stopped at the end of the session. The
# port is chosen at import so test modules can import the URLs; the suite never connects to a
# Redis it did not start (a developer's data on 6379 stays untouched).
SUITE_REDIS = RedisServer()
REDIS_URL = SUITE_REDIS.url(15)  # the limiter's database in tests (``real_redis``)
STORE_REDIS_URL = SUITE_REDIS.url(8)  # the thread store of the ``store_url`` fixture


_Server = TypeVar("_Server", RedisServer, PostgresServer, MariaDBServer)


def _start_or_skip(server: _Server, missing_error: type[Exception]) -> _Server:
    """Start ``server``; without its binaries skip, or fail under CI (whose set-up installs
    them), with the error naming the package."""
    try:
        server.start()
    except missing_error as missing:
        if os.environ.get("CI"):
            pytest.fail(str(missing))
        pytest.skip(str(missing))
    return server


def start_redis_or_skip(server: RedisServer) -> RedisServer:
    """Start ``server``; without the binary skip, or fail under CI (``.ci/run`` installs it)."""
    return _start_or_skip(server, RedisServerMissing)


# The same for PostgreSQL: a cluster in a temporary directory, started on first use.
SUITE_POSTGRES = PostgresServer()
POSTGRES_URL = SUITE_POSTGRES.url()


def start_postgres_or_skip(server: PostgresServer) -> PostgresServer:
    """Start ``server``; without PostgreSQL's binaries skip, or fail under CI (``.ci/setup.sh``
    installs them)."""
    return _start_or_skip(server, PostgresServerMissing)


# The same for MySQL: a MariaDB data directory in a temporary directory, started on first use.
SUITE_MYSQL = MariaDBServer()
MYSQL_URL = SUITE_MYSQL.url()


def start_mysql_or_skip(server: MariaDBServer) -> MariaDBServer:
    """Start ``server``; without MariaDB's binaries skip, or fail under CI
    (``.ci/install-mariadb.sh`` installs them)."""
    return _start_or_skip(server, MariaDBServerMissing)
