"""Faults under load: the limiter's Redis dies or hangs, the upstream misbehaves, gunicorn restarts.

Redis faults use a throw-away ``redis-server`` of their own (never one the suite did not start)
and a threaded in-process server; upstream faults and restarts run the service under gunicorn.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

from chatkit_flask.limits import fallback_active
from chatkit_flask.testing.fake_chatkit import Behaviour, FakeChatKit
from chatkit_flask.testing.redis_server import RedisServer
from tests.services import start_redis_or_skip
from tests.test_multiprocess import service_env, start_gunicorn, stop

pytestmark = pytest.mark.slow
URL = "/api/chatkit/secret"
COOKIE = "chatkit_session_id"
REDIS_TIMEOUT = 0.3


# --- a throw-away Redis ---------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private ``redis-server`` of this test: killed, restarted on the same port, paused."""
    server = start_redis_or_skip(RedisServer())
    yield server
    server.stop()


@dataclass
class Served:
    base: str
    app: Flask
    stop: Callable[[], None]


def serve(app: Flask) -> Served:
    """The app on a threaded werkzeug server on a free loopback port."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def shutdown() -> None:
        server.shutdown()
        thread.join(5)

    return Served(f"http://127.0.0.1:{server.server_port}", app, shutdown)


@dataclass
class Load:
    """Background clients minting as fast as they can, each as a fresh visitor."""

    base: str
    threads: int = 6
    results: list[tuple[int, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = session.post(self.base + URL, json={}, timeout=10).status_code
            except requests.RequestException:
                status = -1
            self.results.append((status, time.monotonic() - started))
            session.cookies.clear()

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            worker = threading.Thread(target=self._run, daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(15)


def mint_as(base: str, cookie: str | None) -> tuple[int, float, str | None]:
    started = time.monotonic()
    response = requests.post(
        base + URL, json={}, cookies={COOKIE: cookie} if cookie else None, timeout=10
    )
    return response.status_code, time.monotonic() - started, response.cookies.get(COOKIE)


def limiter_dead(app: Flask) -> bool:
    return fallback_active(app.extensions["chatkit"].limiter)


def host_app_with_its_limiter(upstream: FakeChatKit, storage_uri: str, **config: Any) -> Flask:
    """A host app that hands its own Flask-Limiter (with its in-memory fallback) over."""
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    from chatkit_flask import ChatKit
    from tests.conftest import base_config

    app = Flask("host")
    app.config.update(base_config(upstream, **config))
    limiter = Limiter(
        get_remote_address, storage_uri=storage_uri, in_memory_fallback_enabled=True, app=app
    )
    ChatKit(app, limiter=limiter)

    @app.get("/readyz")
    def readyz() -> Any:  # the service's readiness check, for the assertions below
        ready = not fallback_active(limiter) and limiter.storage.check()
        return ({"ready": ready}, 200 if ready else 503)

    return app


@pytest.mark.parametrize("limiter", ["own", "handed_over"])
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_redis_fault_under_load(
    make_app: Callable[..., Flask],
    upstream: FakeChatKit,
    own_redis: RedisServer,
    fault: str,
    limiter: str,
) -> None:
    upstream.latency = 0.01
    config: dict[str, Any] = {
        "CHATKIT_RATELIMIT_PER_USER": "20 per minute",
        "CHATKIT_RATELIMIT_PER_IP": "100000 per minute",
        "CHATKIT_REDIS_TIMEOUT": REDIS_TIMEOUT,
        "TESTING": False,
    }
    if limiter == "own":
        app = make_app(RATELIMIT_STORAGE_URI=own_redis.url(), **config)
    else:
        app = host_app_with_its_limiter(upstream, own_redis.url(), **config)
    served = serve(app)
    try:
        with Load(served.base) as load:
            # Phase 1: Redis up. One visitor spends 5 of their 20.
            status, _, cookie = mint_as(served.base, None)
            assert status == 200 and cookie
            for _ in range(4):
                assert mint_as(served.base, cookie)[0] == 200
            assert own_redis.client().dbsize() > 0
            time.sleep(0.3)

            # Phase 2: Redis killed or hung in the middle of the load.
            own_redis.kill() if fault == "killed" else own_redis.pause()
            during = [mint_as(served.base, cookie) for _ in range(25)]
            assert limiter_dead(app)
            time.sleep(0.5)
            assert requests.get(served.base + "/readyz", timeout=5).status_code == 503

            # Phase 3: Redis back (restarted empty, or resumed with its data).
            own_redis.start() if fault == "killed" else own_redis.resume()
            deadline = time.monotonic() + 15
            while limiter_dead(app) and time.monotonic() < deadline:
                mint_as(served.base, None)
                time.sleep(0.1)
            assert not limiter_dead(app), "limits never moved back to Redis"
            before = own_redis.client().dbsize()
            status, _, _ = mint_as(served.base, None)
            assert status == 200
            after_keys = [k.decode() for k in own_redis.client().keys("*")]
            assert len(after_keys) > (before if fault == "hung" else 0)
            time.sleep(0.3)
        results = load.results
    finally:
        served.stop()
        upstream.latency = 0.0

    statuses = Counter(status for status, _ in results) + Counter(s for s, _, _ in during)
    assert set(statuses) <= {200, 429}, statuses  # never a 500 or a dropped connection
    assert statuses[200] > 50  # the load really ran
    # The per-process fallback keeps limiting while Redis is down: the visitor's count starts
    # again in memory, so exactly 20 of 25 pass, then 429.
    assert [s for s, _, _ in during].count(200) == 20
    assert [s for s, _, _ in during][20:] == [429] * 5
    # No stall longer than one Redis socket timeout plus the upstream time (+ scheduling slack).
    slowest = max([d for _, d in results] + [d for _, d, _ in during])
    assert slowest < REDIS_TIMEOUT + 0.7, slowest


def test_limits_are_back_in_redis_after_it_returns(
    make_app: Callable[..., Flask], upstream: FakeChatKit, own_redis: RedisServer
) -> None:
    """After recovery the count is shared again: a second app (another worker) sees it."""
    config: dict[str, Any] = {
        "RATELIMIT_STORAGE_URI": own_redis.url(),
        "CHATKIT_RATELIMIT_PER_USER": "off",
        "CHATKIT_RATELIMIT_PER_IP": "4 per minute",
    }
    first, second = make_app(**config), make_app(**config)
    own_redis.kill()
    assert first.test_client().post(URL, json={}).status_code == 200  # fallback, no 500
    own_redis.start()
    time.sleep(1.1)  # Flask-Limiter re-probes a dead storage after 1 s
    assert first.test_client().post(URL, json={}).status_code == 200
    assert not limiter_dead(first)
    statuses = [
        app.test_client().post(URL, json={}).status_code
        for app in (second, first, second, first)
    ]
    assert statuses == [200, 200, 200, 429]  # 4 per minute across both apps, counted in Redis


# --- upstream faults under gunicorn -------------------------------------------------------------

UPSTREAM_TIMEOUT = 1.0
RETRIES = 2
DURATION = re.compile(r"duration_ms=([0-9.]+)")


@dataclass
class Gunicorn:
    process: subprocess.Popen[bytes]
    base: str
    lines: list[str]


def _drain(process: subprocess.Popen[bytes], lines: list[str]) -> None:
    assert process.stderr is not None
    for raw in iter(process.stderr.readline, b""):
        lines.append(raw.decode("utf-8", "replace"))


def start_service(upstream: FakeChatKit, *args: str, **env: str) -> Gunicorn:
    settings = {
        "RATELIMIT_STORAGE_URI": "memory://",  # these tests are about the upstream, not limits
        "CHATKIT_RATELIMIT_PER_USER": "off",
        "CHATKIT_RATELIMIT_PER_IP": "off",
        "CHATKIT_UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT),
        "CHATKIT_UPSTREAM_RETRIES": str(RETRIES),
        "CHATKIT_METRICS_ENABLED": "false",
        **env,
    }
    environment = service_env(upstream, **settings)
    process, base = start_gunicorn(environment, *args)
    lines: list[str] = []
    threading.Thread(target=_drain, args=(process, lines), daemon=True).start()
    return Gunicorn(process, base, lines)


@pytest.fixture(scope="module")
def gunicorn_faults(_chatkit_api_server: FakeChatKit) -> Iterator[Gunicorn]:
    service = start_service(
        _chatkit_api_server,
        "-w",
        "2",
        "-k",
        "gthread",
        "--threads",
        "4",
        CHATKIT_BREAKER_FAILURES="0",
    )
    yield service
    stop(service.process)


FAULTS = [
    # (behaviour, status, error code, upstream requests per mint)
    (Behaviour.slow(3), 504, "upstream_timeout", 1),
    (Behaviour.hang(), 504, "upstream_timeout", 1),
    (Behaviour.reset(), 502, "upstream_error", 1 + RETRIES),
    (Behaviour.error(500), 502, "upstream_error", 1),
    (Behaviour.error(502), 502, "upstream_error", 1 + RETRIES),
    (Behaviour.error(503), 502, "upstream_error", 1 + RETRIES),
    (Behaviour.error(504), 502, "upstream_error", 1 + RETRIES),
    (Behaviour.rate_limited(retry_after=7), 503, "upstream_busy", 1),
    (Behaviour.non_json(), 502, "upstream_error", 1),
    (Behaviour.missing_secret(), 502, "upstream_error", 1),
    (Behaviour.error(401), 502, "upstream_error", 1),
    (Behaviour.error(403), 502, "upstream_error", 1),
    (Behaviour.error(404), 502, "upstream_error", 1),
    (Behaviour.error(400), 502, "upstream_error", 1),
]
FAULT_IDS = [
    "slow",
    "hang",
    "reset",
    "500",
    "502",
    "503",
    "504",
    "429",
    "non-json",
    "no-secret",
    "401",
    "403",
    "404",
    "400",
]


@pytest.mark.parametrize(("behaviour", "status", "code", "calls"), FAULTS, ids=FAULT_IDS)
def test_upstream_fault_under_concurrent_load(
    gunicorn_faults: Gunicorn,
    upstream: FakeChatKit,
    behaviour: Behaviour,
    status: int,
    code: str,
    calls: int,
) -> None:
    upstream.set_default(behaviour)
    mints = 16
    log_start = len(gunicorn_faults.lines)

    def mint(_: int) -> tuple[requests.Response, float]:
        started = time.monotonic()
        response = requests.post(gunicorn_faults.base + URL, json={}, timeout=30)
        return response, time.monotonic() - started

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(mint, range(mints)))
    for response, _ in results:
        assert response.status_code == status
        body = response.json()
        assert body["error"] == code
        assert set(body) - {"retry_after"} == {"error", "message", "request_id"}
        if status == 503:
            assert response.headers["Retry-After"] == "7"
            assert body["retry_after"] == 7
        else:
            assert "Retry-After" not in response.headers
    # Retries stay within their bound (exactly, here: every attempt is the same fault).
    assert upstream.count == mints * calls
    # No worker thread is held past the deadline: server-side durations from the mint log.
    time.sleep(0.2)
    durations = [
        float(m.group(1)) / 1000
        for line in gunicorn_faults.lines[log_start:]
        if (m := DURATION.search(line))
    ]
    assert len(durations) == mints
    # Within one timeout (a retry after it would take two): 0.5 s of slack for a busy machine.
    assert max(durations) <= UPSTREAM_TIMEOUT + 0.5, max(durations)
    assert max(elapsed for _, elapsed in results) <= 2 * UPSTREAM_TIMEOUT + 1  # two rounds of 8


def test_bursts_of_failures_mixed_with_successes(
    gunicorn_faults: Gunicorn, upstream: FakeChatKit
) -> None:
    """A burst of 500/502/503 and resets amid successes: retried ones recover, none is a 500."""
    burst = [Behaviour.error(500), Behaviour.error(502), Behaviour.error(503), Behaviour.reset()]
    upstream.enqueue(*(burst * 6))

    def mint(_: int) -> int:
        return requests.post(gunicorn_faults.base + URL, json={}, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = Counter(pool.map(mint, range(60)))
    assert set(statuses) <= {200, 502}
    # Every scripted failure was used once and every 200 took one good answer: no extra calls.
    assert upstream.count == len(burst) * 6 + statuses[200]
    # A mint fails only on a 500 (not retried) or on 1 + RETRIES retryable failures in a row.
    assert statuses[502] <= 6 + (18 // (1 + RETRIES))


def test_breaker_frees_threads_when_the_upstream_hangs(upstream: FakeChatKit) -> None:
    """With the breaker on, a hung upstream costs each worker N deadlines, then answers at once."""
    service = start_service(
        upstream,
        "-w",
        "2",
        "-k",
        "gthread",
        "--threads",
        "4",
        CHATKIT_BREAKER_FAILURES="3",
        CHATKIT_BREAKER_COOLDOWN="30",
        CHATKIT_UPSTREAM_RETRIES="0",
    )
    try:
        upstream.set_default(Behaviour.hang())

        def mint(_: int) -> tuple[int, float]:
            started = time.monotonic()
            response = requests.post(service.base + URL, json={}, timeout=30)
            return response.status_code, time.monotonic() - started

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(mint, range(80)))
    finally:
        stop(service.process)
    statuses = Counter(status for status, _ in results)
    assert set(statuses) == {504, 503}
    # Each of the 2 workers lets at most 3 calls fail (plus calls already in flight) then opens.
    assert upstream.count <= 2 * (3 + 4)
    assert statuses[503] >= 80 - 2 * (3 + 4)
    fast = [elapsed for status, elapsed in results if status == 503]
    assert sorted(fast)[len(fast) // 2] < 0.2  # answered at once, not after the deadline
    assert any("upstream circuit open" in line for line in service.lines)


# --- graceful restarts --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_graceful_restart_loses_no_in_flight_mint(
    upstream: FakeChatKit, sig: signal.Signals
) -> None:
    # An upstream timeout well above the 0.5 s latency: this test is about the restart, and a
    # busy machine once stretched two mints past the file's 1 s.
    service = start_service(
        upstream, "-w", "2", "-k", "gthread", "--threads", "4", CHATKIT_UPSTREAM_TIMEOUT="3"
    )
    upstream.latency = 0.5
    signalled = threading.Event()
    signal_at: list[float] = []
    records: list[tuple[float, int | str]] = []

    def client() -> None:
        while not signalled.is_set() or time.monotonic() < signal_at[0] + 1.5:
            started = time.monotonic()
            try:
                # A new connection per mint: "in flight" means the request was sent.
                with requests.Session() as session:
                    status: int | str = session.post(
                        service.base + URL, json={}, timeout=10
                    ).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            records.append((started, status))
            if isinstance(status, str):
                time.sleep(0.05)

    try:
        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.2)  # requests are in flight in every worker thread
        signal_at.append(time.monotonic())
        signalled.set()
        service.process.send_signal(sig)
        for thread in threads:
            thread.join(20)
    finally:
        upstream.latency = 0.0
        stop(service.process)
    before = [status for started, status in records if started < signal_at[0]]
    after = [status for started, status in records if started >= signal_at[0]]
    assert len(before) >= 8
    assert before.count(200) == len(before), Counter(before)
    if sig == signal.SIGHUP:
        # New workers take over on the same socket: nothing is refused during the reload.
        assert after and all(status == 200 for status in after), Counter(after)

