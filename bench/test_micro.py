"""Micro-benchmark of the mint request path without the network.

The service app (``create_app``: logging, metrics, limiter as deployed) with the limiter on
fakeredis (Lua via lupa, in process) and the upstream client replaced by a stub that returns a
``ChatKitSession`` at once. What is left is the per-request CPU of Flask, the identity cookie,
Flask-Limiter/limits, the JSON answer, the mint log line and metrics.

Not part of the main test run (tests live in tests/)::

    .venv/bin/pytest bench/test_micro.py --benchmark-only

CPU per request of one case (A/B of a setting), and a pyinstrument profile::

    .venv/bin/python bench/test_micro.py cpu returning redis RATELIMIT_HEADERS_ENABLED=false

    .venv/bin/python bench/test_micro.py [returning|new|limited] [requests] [redis|fakeredis]

``redis`` is a private ``redis-server`` started on a free port (``CHATKIT_BENCH_REDIS_URL`` names
a Redis you run instead; its database is flushed).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatkit_flask.service import create_app
from chatkit_flask.testing.redis_server import RedisServer, RedisServerMissing
from chatkit_flask.upstream import ChatKitSession

HIGH = "1000000 per minute;1000000 per day"
LIMITED_USER = "1 per 10 minutes;1000000 per day"
_DEVNULL = open(os.devnull, "w")  # noqa: SIM115


class StubClient:
    """Answers ``create_session`` at once, as the real client would on a 200."""

    def create_session(self, **_: Any) -> ChatKitSession:
        return ChatKitSession(
            client_secret="ek_stub_secret",
            expires_at=int(time.time()) + 600,
            session_id="cksess_stub",
            request_id="req_stub",
            status=200,
            latency_ms=1.0,
            attempts=1,
        )


_own_redis: list[RedisServer] = []  # started on first use, stopped at exit


def redis_url() -> str:
    """``CHATKIT_BENCH_REDIS_URL`` (a Redis you run; that database is flushed), else db 14 of a
    private ``redis-server`` this process starts."""
    explicit = os.environ.get("CHATKIT_BENCH_REDIS_URL")
    if explicit:
        return explicit
    if not _own_redis:
        server = RedisServer()
        try:
            server.start()
        except RedisServerMissing as missing:
            pytest.skip(str(missing))
        atexit.register(server.stop)
        _own_redis.append(server)
    return _own_redis[0].url(14)


def storage_config(storage: str) -> dict[str, Any]:
    """fakeredis in process (the brief's default), or a real Redis's bench db (emptied)."""
    if storage == "redis":
        url = redis_url()
        try:
            redis.Redis.from_url(url, socket_timeout=1).flushdb()
        except redis.RedisError:
            pytest.skip(f"Redis at {url} does not answer")
        return {"RATELIMIT_STORAGE_URI": url}
    server = fakeredis.FakeServer()
    pool = redis.ConnectionPool(connection_class=fakeredis.FakeRedisConnection, server=server)
    return {
        "RATELIMIT_STORAGE_URI": "redis://",
        "RATELIMIT_STORAGE_OPTIONS": {"connection_pool": pool},
    }


def build_app(variant: str = "returning", storage: str = "fakeredis", **overrides: Any) -> Flask:
    config: dict[str, Any] = {
        "OPENAI_API_KEY": "bench-key",
        "SECRET_KEY": "bench-secret-key-0123456789abcdef",
        "CHATKIT_WORKFLOW_ID": "wf_bench",
        "CHATKIT_API_BASE": "http://127.0.0.1:9",
        "CHATKIT_COOKIE_SECURE": False,
        "CHATKIT_RATELIMIT_PER_USER": LIMITED_USER if variant == "limited" else HIGH,
        "CHATKIT_RATELIMIT_PER_IP": HIGH,
        "CHATKIT_RATELIMIT_GLOBAL": "off",  # on by default since 0.2.0
    }
    config.update(storage_config(storage))
    config.update(overrides)
    app = create_app(config, environ={})
    app.extensions["chatkit"].client = StubClient()
    # The service logs each mint at INFO to stderr; a benchmark measures the formatting, not
    # the terminal: send the lines to a null stream.
    for name in ("chatkit_flask", "flask-limiter"):
        for handler in logging.getLogger(name).handlers:
            if getattr(handler, "_chatkit_flask", False):
                handler.stream = _DEVNULL
    return app


def make_request(app: Flask, variant: str) -> tuple[FlaskClient, Any]:
    client = app.test_client()
    first = client.post("/api/chatkit/secret", json={})
    assert first.status_code == 200
    if variant == "new":

        def call() -> int:
            client.delete_cookie("chatkit_session_id")
            return client.post("/api/chatkit/secret", json={}).status_code

    else:

        def call() -> int:
            return client.post("/api/chatkit/secret", json={}).status_code

    return client, call


@pytest.mark.parametrize("storage", ["fakeredis", "redis"])
@pytest.mark.parametrize("variant", ["returning", "new", "limited"])
def test_mint_path(benchmark: Any, variant: str, storage: str) -> None:
    app = build_app(variant, storage)
    _, call = make_request(app, variant)
    expected = 429 if variant == "limited" else 200
    assert call() == expected
    benchmark.pedantic(call, rounds=400, iterations=1, warmup_rounds=50)
    assert call() == expected


def profile(variant: str, requests: int, storage: str) -> None:
    from pyinstrument import Profiler

    app = build_app(variant, storage)
    _, call = make_request(app, variant)
    for _ in range(50):
        call()
    profiler = Profiler(interval=0.0001)
    profiler.start()
    started = time.perf_counter()
    for _ in range(requests):
        call()
    elapsed = time.perf_counter() - started
    profiler.stop()
    print(profiler.output_text(unicode=False, color=False, show_all=False))
    print(f"{variant}: {1e3 * elapsed / requests:.3f} ms per request (profiled)")


def cpu(variant: str, storage: str, overrides: dict[str, Any]) -> None:
    """CPU ms per request (thread CPU, best of 5 x 1000): steadier than wall time for A/B."""
    app = build_app(variant, storage, **overrides)
    _, call = make_request(app, variant)
    for _ in range(200):
        call()
    best = []
    for _ in range(5):
        started = time.thread_time()
        for _ in range(1000):
            call()
        best.append(time.thread_time() - started)
    print(f"{variant} {storage} {overrides or ''}: {min(best):.3f} ms CPU per request")


if __name__ == "__main__":
    if sys.argv[1:2] == ["cpu"]:
        # bench/test_micro.py cpu returning redis [KEY=VALUE ...]
        cpu(sys.argv[2], sys.argv[3], dict(a.split("=", 1) for a in sys.argv[4:]))
    else:
        profile(
            sys.argv[1] if len(sys.argv) > 1 else "returning",
            int(sys.argv[2]) if len(sys.argv) > 2 else 2000,
            sys.argv[3] if len(sys.argv) > 3 else "redis",
        )
