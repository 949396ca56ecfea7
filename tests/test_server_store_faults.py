"""Faults in server mode's Redis store (issue 24, items 6 and 7): a restart that loses no data
costs no request, and a Redis that would lose threads on a restart is reported at start-up.

Each test runs its own ``redis-server`` (a free port, a temporary directory): never a shared one.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis

pytest.importorskip("chatkit")
from chatkit.types import ThreadMetadata
from flask import Flask

from chatkit_flask.server.context import RequestContext
from chatkit_flask.server.store import open_store
from chatkit_flask.settings import ConfigError
from chatkit_flask.testing.fake_responses import FakeResponses
from tests.conftest import TEST_API_KEY
from tests.test_multiprocess import free_port
from tests.test_server_mode import close_app

CONTEXT = RequestContext(owner="visitor:alice", request_id="req-test")


class PersistentRedis:
    """A redis-server with append-only persistence in ``directory``, restartable on one port."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.options = options or ("--appendonly", "yes", "--save", "")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), *self.options],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def restart(self) -> None:
        """A clean restart (SIGTERM, as a deploy or a systemd restart sends): AOF keeps data."""
        assert self.process is not None
        self.process.terminate()
        self.process.wait(10)
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    server = PersistentRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_restart_that_keeps_the_data_costs_no_request(persistent_redis: PersistentRedis) -> None:
    store = open_store(persistent_redis.url, thread_ttl=3600)

    async def scenario() -> tuple[list[object], list[object]]:
        thread = ThreadMetadata(id=store.generate_thread_id(CONTEXT), created_at=datetime.now())
        await store.save_thread(thread, CONTEXT)
        # Several pooled connections, as a busy worker holds.
        await asyncio.gather(*[store.load_threads(10, None, "desc", CONTEXT) for _ in range(8)])
        persistent_redis.restart()
        together = await asyncio.gather(
            *[store.load_threads(10, None, "desc", CONTEXT) for _ in range(8)],
            return_exceptions=True,
        )
        one_by_one: list[object] = []
        for _ in range(30):
            try:
                one_by_one.append(await store.load_threads(10, None, "desc", CONTEXT))
            except Exception as exc:  # collected: the assertion names them
                one_by_one.append(exc)
        return together, one_by_one

    together, one_by_one = asyncio.run(scenario())

    failures = [type(r).__name__ for r in together + one_by_one if isinstance(r, Exception)]
    assert failures == []
    assert all(len(page.data) == 1 for page in together + one_by_one)  # type: ignore[union-attr]


def test_a_hung_store_is_still_not_retried(persistent_redis: PersistentRedis) -> None:
    """The reconnect retry covers dead connections only: a paused Redis fails in one timeout."""
    store = open_store(persistent_redis.url + "?socket_timeout=0.5", thread_ttl=3600)
    assert persistent_redis.process is not None

    async def scenario() -> float:
        await store.load_threads(10, None, "desc", CONTEXT)  # connected
        persistent_redis.process.send_signal(19)  # SIGSTOP
        started = time.monotonic()
        try:
            with pytest.raises(redis.TimeoutError):
                await store.load_threads(10, None, "desc", CONTEXT)
        finally:
            persistent_redis.process.send_signal(18)  # SIGCONT
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.9


# ------------------------------------------- item 7: persistence at start-up
def store_app(url: str, tmp_path: Path, **overrides: object) -> Flask:
    from chatkit_flask.service import create_app
    from tests.test_server_mode import server_config

    with FakeResponses(api_key=TEST_API_KEY) as fake:
        return create_app(server_config(fake, url, **overrides), environ={})


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    """A Redis as tests and caches run it: nothing on disk, evicting when full."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    server = PersistentRedis(
        tmp_path, "--appendonly", "no", "--save", "", "--maxmemory-policy", "allkeys-lru"
    )
    server.start()
    yield server
    server.stop()


def test_a_redis_store_that_would_lose_threads_is_reported_at_start_up(
    volatile_redis: PersistentRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("chatkit_flask").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="chatkit_flask"):
            app = store_app(volatile_redis.url, tmp_path)
    finally:
        logging.getLogger("chatkit_flask").removeHandler(caplog.handler)
    close_app(app)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("keeps nothing on disk" in w and "loses every thread" in w for w in warnings)
    assert any("maxmemory-policy allkeys-lru" in w and "noeviction" in w for w in warnings)


def test_the_setting_refuses_such_a_store(volatile_redis: PersistentRedis, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        store_app(volatile_redis.url, tmp_path, CHATKIT_STORE_REQUIRE_PERSISTENCE=True)

    assert refused.value.key == "CHATKIT_STORE_REQUIRE_PERSISTENCE"
    assert "keeps nothing on disk" in str(refused.value)


def test_a_durable_store_starts_with_the_setting_and_check_says_nothing(
    persistent_redis: PersistentRedis, tmp_path: Path
) -> None:
    redis.Redis(port=persistent_redis.port).config_set("maxmemory-policy", "noeviction")
    app = store_app(persistent_redis.url, tmp_path, CHATKIT_STORE_REQUIRE_PERSISTENCE=True)
    try:
        output = app.test_cli_runner().invoke(args=["chatkit", "check"]).output
    finally:
        close_app(app)

    assert "Thread store:" in output
    assert "keeps nothing on disk" not in output and "maxmemory-policy" not in output


def test_check_names_what_would_be_lost(volatile_redis: PersistentRedis, tmp_path: Path) -> None:
    app = store_app(volatile_redis.url, tmp_path)
    try:
        output = app.test_cli_runner().invoke(args=["chatkit", "check"]).output
    finally:
        close_app(app)

    assert "warn  the thread store's Redis" in output
    assert "loses every thread" in output
