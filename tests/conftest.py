"""Shared fixtures: a fake ChatKit API on a real loopback socket, apps, and limiter storages
(fakeredis in-process, and a real ``redis-server`` that the suite starts and stops itself)."""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from chatkit_flask import testing
from chatkit_flask.service import create_app
from chatkit_flask.testing.fake_chatkit import FakeChatKit
from chatkit_flask.testing.fake_responses import FakeResponses
from chatkit_flask.testing.mariadb_server import MariaDBServer
from chatkit_flask.testing.postgres_server import PostgresServer
from chatkit_flask.testing.redis_server import RedisServer
from tests.services import (
    MYSQL_URL,
    POSTGRES_URL,
    REDIS_URL,
    STORE_REDIS_URL,
    SUITE_MYSQL,
    SUITE_POSTGRES,
    SUITE_REDIS,
    start_mysql_or_skip,
    start_postgres_or_skip,
    start_redis_or_skip,
)

# Deliberately not shaped like a real key (the repo's secret scan looks for sk-...).
TEST_API_KEY = testing.TEST_API_KEY

# An object of an earlier test collected deep inside a hypothesis test (an asyncio stream left
# to the garbage collector) once made pytest's unraisable-exception hook run out of stack while
# formatting its traceback, failing an unrelated test. Room enough for the hook to report it
# as the warning it is.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 4000))
TEST_SECRET_KEY = "test-secret-key-for-signing-visitor-cookies"
WORKFLOW = "wf_test_main"


# The package's own fixture for host apps (``chatkit_api``) is the suite's fake ChatKit API too.
pytest_plugins = ["chatkit_flask.testing.pytest_plugin"]


@pytest.fixture
def upstream(chatkit_api: FakeChatKit) -> FakeChatKit:
    """The fake ChatKit API, reset for each test."""
    return chatkit_api


def base_config(upstream: FakeChatKit, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "OPENAI_API_KEY": TEST_API_KEY,
        "SECRET_KEY": TEST_SECRET_KEY,
        "CHATKIT_BACKEND": "hosted",  # the default is server; these fixtures serve hosted mode
        "CHATKIT_WORKFLOW_ID": WORKFLOW,
        "CHATKIT_API_BASE": upstream.base_url,
        "CHATKIT_COOKIE_SECURE": False,
        "CHATKIT_UPSTREAM_TIMEOUT": 2,
        "RATELIMIT_STORAGE_URI": "memory://",
        "TESTING": True,
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The suite's ``redis-server`` (a free port, a temporary directory, no persistence)."""
    yield start_redis_or_skip(SUITE_REDIS)
    SUITE_REDIS.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The suite's own PostgreSQL (started on first use, stopped with its data at the end)."""
    yield start_postgres_or_skip(SUITE_POSTGRES)
    SUITE_POSTGRES.stop()


@pytest.fixture(scope="session")
def postgres_schema(postgres_server: PostgresServer) -> str:
    """The suite's PostgreSQL with the SQL store's tables made by the migrations (once)."""
    from chatkit_flask.server.sql_schema import upgrade

    upgrade(POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture
def postgres_tables(postgres_schema: str) -> str:
    """The URL of the suite's PostgreSQL, the store's tables empty."""
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_schema, poolclass=sa.NullPool)
    with engine.begin() as db:
        db.execute(sa.text("TRUNCATE chatkit_threads, chatkit_items, chatkit_attachments"))
    engine.dispose()
    return postgres_schema


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[MariaDBServer]:
    """The suite's own MariaDB (started on first use, stopped with its data at the end)."""
    yield start_mysql_or_skip(SUITE_MYSQL)
    SUITE_MYSQL.stop()


@pytest.fixture(scope="session")
def mysql_schema(mysql_server: MariaDBServer) -> str:
    """The suite's MariaDB with the SQL store's tables made by the migrations (once)."""
    pytest.importorskip("aiomysql")
    from chatkit_flask.server.sql_schema import upgrade

    upgrade(MYSQL_URL)
    return MYSQL_URL


@pytest.fixture
def mysql_tables(mysql_schema: str) -> str:
    """The URL of the suite's MariaDB, the store's tables empty (``DELETE``: InnoDB refuses to
    ``TRUNCATE`` a table a foreign key names)."""
    import sqlalchemy as sa

    engine = sa.create_engine(mysql_schema, poolclass=sa.NullPool)
    with engine.begin() as db:
        for table in ("chatkit_attachments", "chatkit_items", "chatkit_threads"):
            db.execute(sa.text(f"DELETE FROM {table}"))
    engine.dispose()
    return mysql_schema


@pytest.fixture(scope="module")
def _fake() -> Iterator[FakeResponses]:
    """One fake Responses API per test module (a loopback socket)."""
    with FakeResponses(api_key=TEST_API_KEY) as server:
        yield server


@pytest.fixture
def fake(_fake: FakeResponses) -> FakeResponses:
    """The module's fake model, cleared: it echoes the last user message."""
    _fake.clear()
    return _fake


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every thread store, for the server-mode tests that take it: a SQLite file, the suite's
    Redis (its own database, emptied) or the suite's PostgreSQL or MariaDB (the SQL store's
    tables emptied)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/threads.db"
        return
    if request.param in ("postgres", "mysql"):
        yield request.getfixturevalue(f"{request.param}_tables")
        return
    request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(STORE_REDIS_URL, socket_timeout=1)
    client.flushdb()
    yield STORE_REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def real_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The suite's Redis, database 15 (``REDIS_URL``), emptied before and after the test."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def fakeredis_config() -> dict[str, Any]:
    """Limiter storage config on a fresh fakeredis server (`_fake_server` simulates outages)."""
    server = fakeredis.FakeServer()
    pool = redis.ConnectionPool(connection_class=fakeredis.FakeRedisConnection, server=server)
    return {
        "RATELIMIT_STORAGE_URI": "redis://",
        "RATELIMIT_STORAGE_OPTIONS": {"connection_pool": pool},
        "_fake_server": server,
    }


@pytest.fixture(params=["fakeredis", "redis"])
def storage(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Limiter storage config: fakeredis (Lua via lupa) and the real Redis server."""
    if request.param == "fakeredis":
        return fakeredis_config()
    request.getfixturevalue("real_redis")
    return {"RATELIMIT_STORAGE_URI": REDIS_URL}


@pytest.fixture
def make_app(upstream: FakeChatKit) -> Callable[..., Flask]:
    """Build the service app against the fake upstream; keyword arguments override config."""

    def factory(**overrides: Any) -> Flask:
        overrides = {k: v for k, v in overrides.items() if not k.startswith("_")}
        return create_app(base_config(upstream, **overrides), environ={})

    return factory


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def mint_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture everything the package logs (the service sets propagate=False on its loggers)."""
    for name in ("chatkit_flask", "flask-limiter"):
        logging.getLogger(name).addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    yield caplog
    for name in ("chatkit_flask", "flask-limiter"):
        logging.getLogger(name).removeHandler(caplog.handler)


@pytest.fixture
def hung_redis() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: a paused Redis."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()
