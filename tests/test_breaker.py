"""The upstream circuit breaker: opens after N consecutive failures, answers at once while open,
lets one trial through after the cool-down, closes on success."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import Flask

from chatkit_flask.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from chatkit_flask.settings import ConfigError, Settings
from chatkit_flask.testing.fake_chatkit import Behaviour, FakeChatKit
from chatkit_flask.upstream import ChatKitClient, CircuitOpen, UpstreamUnavailable
from tests.conftest import TEST_API_KEY, base_config

URL = "/api/chatkit/secret"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_n_consecutive_failures_and_half_opens_after_cooldown() -> None:
    clock = Clock()
    changes: list[str] = []
    breaker = CircuitBreaker(3, 10, clock=clock, on_change=changes.append)
    for _ in range(2):
        assert breaker.allow() == (True, 0.0)
        breaker.record_failure()
    assert breaker.state == CLOSED
    assert breaker.allow()[0]
    breaker.record_failure()
    assert breaker.state == OPEN
    allowed, remaining = breaker.allow()
    assert not allowed and remaining == pytest.approx(10)
    clock.now += 9.2
    allowed, remaining = breaker.allow()
    assert not allowed and breaker.retry_after(remaining) == 1
    clock.now += 1
    assert breaker.state == HALF_OPEN
    assert breaker.allow() == (True, 0.0)  # the one trial
    assert breaker.allow()[0] is False  # others wait while it is in flight
    breaker.record_success()
    assert breaker.state == CLOSED
    assert breaker.allow()[0]
    assert changes == [OPEN, HALF_OPEN, CLOSED]


def test_failed_trial_reopens_for_a_full_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 5, clock=clock)
    breaker.allow()
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow()[0]
    breaker.record_failure()
    allowed, remaining = breaker.allow()
    assert not allowed and remaining == pytest.approx(5)


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(3, 10)
    for outcome in ("f", "f", "s", "f", "f"):
        breaker.allow()
        breaker.record_failure() if outcome == "f" else breaker.record_success()
    assert breaker.state == CLOSED


def test_zero_failures_disables_it() -> None:
    breaker = CircuitBreaker(0, 10)
    for _ in range(100):
        breaker.record_failure()
    assert breaker.allow() == (True, 0.0)


def test_only_one_trial_under_concurrency() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1, clock=clock)
    breaker.allow()
    breaker.record_failure()
    clock.now += 2
    barrier = threading.Barrier(16)

    def attempt(_: int) -> bool:
        barrier.wait()
        return breaker.allow()[0]

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(attempt, range(16))) == 1


def test_settings_defaults_and_validation(upstream: FakeChatKit) -> None:
    settings = Settings.from_mapping(base_config(upstream))
    assert (settings.breaker_failures, settings.breaker_cooldown) == (5, 10.0)
    settings = Settings.from_mapping(
        base_config(upstream, CHATKIT_BREAKER_FAILURES="0", CHATKIT_BREAKER_COOLDOWN="2.5")
    )
    assert (settings.breaker_failures, settings.breaker_cooldown) == (0, 2.5)
    with pytest.raises(ConfigError, match="CHATKIT_BREAKER_FAILURES"):
        Settings.from_mapping(base_config(upstream, CHATKIT_BREAKER_FAILURES="-1"))
    with pytest.raises(ConfigError, match="CHATKIT_BREAKER_COOLDOWN"):
        Settings.from_mapping(base_config(upstream, CHATKIT_BREAKER_COOLDOWN="0"))


def test_client_raises_circuit_open_without_calling(upstream: FakeChatKit) -> None:
    client = ChatKitClient(TEST_API_KEY, api_base=upstream.base_url, retries=0, breaker_failures=2)
    upstream.set_default(Behaviour.error(500))
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable):
            client.create_session(workflow_id="wf_x", user="u", ttl=60)
    with pytest.raises(CircuitOpen) as raised:
        client.create_session(workflow_id="wf_x", user="u", ttl=60)
    assert raised.value.retry_after == 10
    assert upstream.count == 2


# --- through the app ----------------------------------------------------------------------------


def breaker_app(make_app: Callable[..., Flask], **config: object) -> Flask:
    defaults = {
        "CHATKIT_BREAKER_FAILURES": 3,
        "CHATKIT_BREAKER_COOLDOWN": 0.5,
        "CHATKIT_UPSTREAM_RETRIES": 0,
        "CHATKIT_RATELIMIT_PER_USER": "",
        "CHATKIT_RATELIMIT_PER_IP": "",
    }
    defaults.update(config)
    return make_app(**defaults)


@pytest.mark.parametrize(
    "failure",
    [Behaviour.error(500), Behaviour.error(503), Behaviour.reset(), Behaviour.non_json()],
    ids=["500", "503", "reset", "non-json"],
)
def test_open_circuit_answers_503_at_once_then_recovers(
    make_app: Callable[..., Flask],
    upstream: FakeChatKit,
    mint_logs: pytest.LogCaptureFixture,
    failure: Behaviour,
) -> None:
    client = breaker_app(make_app).test_client()
    upstream.set_default(failure)
    assert [client.post(URL, json={}).status_code for _ in range(3)] == [502, 502, 502]
    assert upstream.count == 3
    started = time.monotonic()
    response = client.post(URL, json={})
    assert time.monotonic() - started < 0.1
    assert response.status_code == 503
    body = response.get_json()
    assert body["error"] == "upstream_unavailable"
    assert set(body) == {"error", "message", "request_id", "retry_after"}
    assert response.headers["Retry-After"] == "1"
    assert upstream.count == 3  # not called while open
    upstream.set_default(None)
    time.sleep(0.55)
    assert client.post(URL, json={}).status_code == 200  # the half-open trial
    assert client.post(URL, json={}).status_code == 200
    warnings = [r.getMessage() for r in mint_logs.records if "circuit" in r.getMessage()]
    assert any("circuit open" in line for line in warnings)
    assert any("circuit half-open" in line for line in warnings)
    assert any("circuit closed" in line for line in warnings)
    assert all(
        r.levelno == logging.WARNING for r in mint_logs.records if "circuit" in r.getMessage()
    )


def test_timeouts_open_the_circuit(make_app: Callable[..., Flask], upstream: FakeChatKit) -> None:
    client = breaker_app(make_app, CHATKIT_UPSTREAM_TIMEOUT=0.2, CHATKIT_BREAKER_COOLDOWN=30)
    client = client.test_client()
    upstream.set_default(Behaviour.slow(1))
    assert [client.post(URL, json={}).status_code for _ in range(3)] == [504, 504, 504]
    response = client.post(URL, json={})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "30"


@pytest.mark.parametrize(
    "behaviour",
    [Behaviour.error(401), Behaviour.error(404), Behaviour.error(400), Behaviour.rate_limited(2)],
    ids=["401", "404", "400", "429"],
)
def test_4xx_and_429_never_open_the_circuit(
    make_app: Callable[..., Flask], upstream: FakeChatKit, behaviour: Behaviour
) -> None:
    client = breaker_app(make_app).test_client()
    upstream.set_default(behaviour)
    statuses = {client.post(URL, json={}).status_code for _ in range(6)}
    assert upstream.count == 6
    assert "upstream_unavailable" not in client.post(URL, json={}).get_data(as_text=True)
    assert statuses <= {502, 503}


def test_failed_trial_keeps_it_open(make_app: Callable[..., Flask], upstream: FakeChatKit) -> None:
    client = breaker_app(make_app, CHATKIT_BREAKER_FAILURES=1).test_client()
    upstream.set_default(Behaviour.error(500))
    assert client.post(URL, json={}).status_code == 502
    assert client.post(URL, json={}).status_code == 503
    time.sleep(0.55)
    assert client.post(URL, json={}).status_code == 502  # trial went upstream and failed
    assert client.post(URL, json={}).status_code == 503
    assert upstream.count == 2


def test_zero_disables_the_breaker(make_app: Callable[..., Flask], upstream: FakeChatKit) -> None:
    client = breaker_app(make_app, CHATKIT_BREAKER_FAILURES=0).test_client()
    upstream.set_default(Behaviour.error(500))
    assert {client.post(URL, json={}).status_code for _ in range(10)} == {502}
    assert upstream.count == 10
