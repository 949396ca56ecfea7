"""``flask chatkit check|limits|usage|reset`` against the real Redis and the fake ChatKit API."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import redis
from click.testing import Result
from flask import Flask

from chatkit_flask.cli import (
    CHECK_USER,
    EXIT_MISCONFIGURED,
    EXIT_UNREACHABLE,
    mask_api_key,
    mask_storage_uri,
)
from chatkit_flask.identity import hash_id
from chatkit_flask.testing.fake_chatkit import Behaviour, FakeChatKit
from tests.conftest import REDIS_URL, TEST_API_KEY, TEST_SECRET_KEY

URL = "/api/chatkit/secret"
COOKIE = "chatkit_session_id"


def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=["chatkit", *args])


@pytest.fixture
def redis_app(make_app: Callable[..., Flask], real_redis: redis.Redis) -> Callable[..., Flask]:
    def factory(**config: Any) -> Flask:
        # A key prefix: ``flask chatkit usage``/``reset`` must read the prefixed counters.
        config.setdefault("RATELIMIT_KEY_PREFIX", "chatkit")
        return make_app(RATELIMIT_STORAGE_URI=REDIS_URL, **config)

    return factory


def assert_no_secrets(output: str) -> None:
    assert TEST_API_KEY not in output
    assert TEST_SECRET_KEY not in output
    assert "ek_fake_" not in output  # the fake's client secrets


# ----------------------------------------------------------------------- check


def test_check_prints_settings_without_secrets(redis_app: Callable[..., Flask]) -> None:
    result = run(redis_app(), "check")
    assert result.exit_code == 0, result.output
    assert f"OPENAI_API_KEY = ...{TEST_API_KEY[-4:]}" in result.output
    assert "SECRET_KEY = (set)" in result.output
    assert "CHATKIT_RATELIMIT_PER_USER = 10 per minute;100 per day" in result.output
    assert f"ok    {REDIS_URL} answers" in result.output
    assert "not contacted" in result.output
    assert "All checks passed." in result.output
    assert_no_secrets(result.output)


def test_check_shows_server_mode_first_and_marks_the_keys_it_does_not_read(
    real_redis: redis.Redis, tmp_path: Any
) -> None:
    from chatkit_flask.service import create_app
    from chatkit_flask.settings import OPTIONS, backend_of

    config = {
        "OPENAI_API_KEY": TEST_API_KEY,
        "SECRET_KEY": TEST_SECRET_KEY,
        "CHATKIT_STORE_URL": f"sqlite:///{tmp_path}/threads.db",
        "RATELIMIT_STORAGE_URI": REDIS_URL,
        "TESTING": True,
    }
    app = create_app(config, environ={})
    try:
        result = run(app, "check")
    finally:
        app.extensions["chatkit"].server.bridge.close()
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (
        "Backend: server (the default: CHATKIT_BACKEND and CHATKIT_WORKFLOW_ID are unset)"
    )
    shown = [line.split(" = ")[0].strip() for line in lines if " = " in line]
    assert shown[:3] == ["OPENAI_API_KEY", "SECRET_KEY", "CHATKIT_BACKEND"]
    assert shown.index("CHATKIT_STORE_URL") < shown.index("CHATKIT_COOKIE_NAME")
    hosted = [name for name in OPTIONS if backend_of(name) == "hosted"]
    assert "CHATKIT_WORKFLOW_ID" in hosted and shown[-len(hosted):] == hosted  # last, marked
    heading = lines.index("Not read in server mode (hosted mode's keys):")
    assert lines[heading + 1] == "  CHATKIT_WORKFLOW_ID = (unset)"
    assert_no_secrets(result.output)


def test_check_says_the_log_settings_are_the_services_only(
    redis_app: Callable[..., Flask],
) -> None:
    # A host app configures the chatkit_flask logger; these two would silently do nothing there.
    output = run(redis_app(CHATKIT_LOG_FORMAT="json"), "check").output
    only = "(service only: a host app configures the chatkit_flask logger)"
    assert f"CHATKIT_LOG_FORMAT = json  {only}" in output
    assert f"CHATKIT_LOG_LEVEL = info  {only}" in output
    assert only not in output.split("CHATKIT_LOG_LEVEL")[0].split("CHATKIT_LOG_FORMAT")[0]


def test_masking() -> None:
    key_shaped = "sk-proj-" + "abcdefghijklmnopqrstuvwxyz1234"  # split: not a real key
    assert mask_api_key(key_shaped) == "sk-...1234"
    assert mask_api_key("short") == "***"
    assert mask_api_key(None) == "(not set)"
    assert mask_storage_uri("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    assert mask_storage_uri("rediss://app:hunter2@redis:6380/1") == "rediss://app:***@redis:6380/1"
    assert mask_storage_uri("redis://redis:6379/0") == "redis://redis:6379/0"


def test_check_fails_when_storage_is_unreachable(make_app: Callable[..., Flask]) -> None:
    app = make_app(RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{closed_port()}/0")
    result = run(app, "check")
    assert result.exit_code == EXIT_UNREACHABLE
    assert "cannot reach the limiter storage" in result.output


def test_check_live_mints_and_cancels(
    redis_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    result = run(redis_app(), "check", "--live")
    assert result.exit_code == 0, result.output
    paths = [request.path for request in upstream.requests]
    assert paths[0] == "/v1/chatkit/sessions"
    assert paths[1].startswith("/v1/chatkit/sessions/cksess_")
    assert paths[1].endswith("/cancel")
    assert len(paths) == 2
    assert upstream.requests[0].json["user"] == CHECK_USER
    (session,) = upstream.sessions.values()
    assert session["status"] == "cancelled"
    assert f"cancelled session {session['id']}" in result.output
    assert_no_secrets(result.output)


def test_check_live_with_a_wrong_key(
    redis_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    wrong = "wrong-openai-key-000000000000000000000"
    result = run(redis_app(OPENAI_API_KEY=wrong), "check", "--live")
    assert result.exit_code == EXIT_MISCONFIGURED
    assert "the API key is wrong or revoked" in result.output
    assert wrong not in result.output
    assert [request.path for request in upstream.requests] == ["/v1/chatkit/sessions"]


@pytest.mark.parametrize(
    ("status", "message", "exit_code"),
    [
        (404, "workflow not found: the key must belong to the workflow's project",
         EXIT_MISCONFIGURED),
        (403, "permission denied (403)", EXIT_MISCONFIGURED),
        (400, "rejected the session request (400): Bad request.", EXIT_MISCONFIGURED),
        (500, "the ChatKit API failed (500)", EXIT_UNREACHABLE),
        (429, "rate limited the check (429)", EXIT_UNREACHABLE),
    ],
)  # fmt: skip
def test_check_live_explains_upstream_errors(
    redis_app: Callable[..., Flask],
    upstream: FakeChatKit,
    status: int,
    message: str,
    exit_code: int,
) -> None:
    upstream.set_default(Behaviour.error(status))
    result = run(redis_app(CHATKIT_UPSTREAM_RETRIES=0), "check", "--live")
    assert result.exit_code == exit_code
    assert message in result.output


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_check_live_cannot_connect(redis_app: Callable[..., Flask]) -> None:
    port = closed_port()
    app = redis_app(CHATKIT_API_BASE=f"http://127.0.0.1:{port}", CHATKIT_UPSTREAM_RETRIES=0)
    result = run(app, "check", "--live")
    assert result.exit_code == EXIT_UNREACHABLE
    assert f"cannot reach CHATKIT_API_BASE host 127.0.0.1:{port}" in result.output


def test_check_live_timeout(redis_app: Callable[..., Flask], upstream: FakeChatKit) -> None:
    upstream.set_default(Behaviour.slow(2))
    result = run(redis_app(CHATKIT_UPSTREAM_TIMEOUT=0.3), "check", "--live")
    assert result.exit_code == EXIT_UNREACHABLE
    assert "did not answer within CHATKIT_UPSTREAM_TIMEOUT=0.3s (timeout)" in result.output


# ----------------------------------------------------------------------- limits


def test_limits(make_app: Callable[..., Flask]) -> None:
    app = make_app(
        RATELIMIT_STORAGE_URI="redis://:hunter2@127.0.0.1:1/15",
        CHATKIT_RATELIMIT_GLOBAL="1000 per hour",
        RATELIMIT_STRATEGY="moving-window",
    )
    result = run(app, "limits")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "per user:     10 per minute; 100 per day" in lines
    assert "per IP:       30 per minute; 200 per day (IPv6 per /64)" in lines
    assert "global:       1000 per hour" in lines
    assert "strategy:     moving-window" in lines
    assert "storage:      redis://:***@127.0.0.1:1/15" in lines
    assert "hunter2" not in result.output


# ----------------------------------------------------------------------- usage / reset


def mint(app: Flask, n: int) -> str:
    """Mint n times as one visitor; return the visitor cookie's value."""
    client = app.test_client()
    for _ in range(n):
        assert client.post(URL, json={}).status_code == 200
    return client.get_cookie(COOKIE).value


def test_usage_after_three_mints_then_reset(
    redis_app: Callable[..., Flask], real_redis: redis.Redis
) -> None:
    app = redis_app()
    cookie = mint(app, 3)
    raw = cookie.split(".", 1)[0]
    tag = hash_id(raw)
    # The keys the CLI reads are the ones the limiter wrote.
    keys = {key.decode() for key in real_redis.keys("LIMITS:LIMITER/chatkit/visitor:*")}
    assert keys == {
        f"LIMITS:LIMITER/chatkit/visitor:{tag}/chatkit.secret/10/1/minute",
        f"LIMITS:LIMITER/chatkit/visitor:{tag}/chatkit.secret/100/1/day",
    }

    for given in (raw, cookie, f"visitor_{raw}", f"v:{tag}", f"__Host-{COOKIE}={cookie}"):
        result = run(app, "usage", "--visitor", given)
        assert result.exit_code == 0, result.output
        assert f"user limits for visitor:{tag}:" in result.output
        assert "10 per 1 minute: 7 of 10 remaining (3 used, resets in" in result.output
        assert "100 per 1 day: 97 of 100 remaining (3 used" in result.output

    ip = run(app, "usage", "--ip", "127.0.0.1")
    assert "30 per 1 minute: 27 of 30 remaining" in ip.output

    reset = run(app, "reset", "--visitor", raw)
    assert reset.exit_code == 0, reset.output
    assert f"Cleared 2 user limit counter(s) for visitor:{tag} (2 had been used)." in reset.output
    assert not real_redis.keys("LIMITS:LIMITER/chatkit/visitor:*")
    after = run(app, "usage", "--visitor", raw)
    assert "10 per 1 minute: 10 of 10 remaining (0 used)" in after.output
    # The IP's counters were not touched.
    assert "27 of 30 remaining" in run(app, "usage", "--ip", "127.0.0.1").output


def test_reset_lets_a_limited_visitor_mint_again(redis_app: Callable[..., Flask]) -> None:
    app = redis_app(CHATKIT_RATELIMIT_PER_USER="2 per minute")
    client = app.test_client()
    assert [client.post(URL, json={}).status_code for _ in range(3)] == [200, 200, 429]
    raw = client.get_cookie(COOKIE).value.split(".", 1)[0]
    result = run(app, "reset", "--visitor", raw)
    assert "Cleared 1 user limit counter(s)" in result.output
    assert client.post(URL, json={}).status_code == 200


def test_ip_and_global_keys(redis_app: Callable[..., Flask]) -> None:
    app = redis_app(CHATKIT_RATELIMIT_GLOBAL="50 per hour")
    mint(app, 2)
    result = run(app, "usage", "--global")
    assert "global limits for global:" in result.output
    assert "50 per 1 hour: 48 of 50 remaining" in result.output
    reset = run(app, "reset", "--ip", "127.0.0.1")
    assert "Cleared 2 ip limit counter(s) for ip:127.0.0.1 (2 had been used)." in reset.output
    v6 = run(app, "usage", "--ip", "2001:db8::1")
    assert "ip limits for ip:2001:db8::/64:" in v6.output


def test_user_key_is_hashed(redis_app: Callable[..., Flask]) -> None:
    result = run(redis_app(), "usage", "--user", "alice@example.com")
    assert result.exit_code == 0, result.output
    assert f"user:{hash_id('user:alice@example.com')}" in result.output
    assert "alice" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["usage"],
        ["usage", "--visitor", "a", "--ip", "127.0.0.1"],
        ["reset", "--ip", "not-an-ip"],
    ],
)
def test_usage_errors(redis_app: Callable[..., Flask], args: list[str]) -> None:
    result = run(redis_app(), *args)
    assert result.exit_code == 2, result.output


def test_usage_of_a_limit_that_is_off(redis_app: Callable[..., Flask]) -> None:
    result = run(redis_app(CHATKIT_RATELIMIT_GLOBAL="off"), "usage", "--global")
    assert result.exit_code == 1
    assert "the global limit is off" in result.output


def test_usage_when_storage_is_down(make_app: Callable[..., Flask]) -> None:
    app = make_app(RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{closed_port()}/0")
    result = run(app, "usage", "--ip", "127.0.0.1")
    assert result.exit_code == 1
    assert "cannot read the limiter storage" in result.output
