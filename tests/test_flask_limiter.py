"""Flask-Limiter is the limiter of record: a host app's own Limiter in every state, its CLI,
its switches and hooks, and storage faults on a handed-over limiter."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask, jsonify, make_response
from flask_limiter import Limiter, RequestLimit
from flask_limiter.commands import cli as limiter_cli  # what `flask limiter` runs
from flask_limiter.util import get_remote_address

from chatkit_flask import ChatKit, ConfigError
from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.conftest import REDIS_URL, base_config

URL = "/api/chatkit/secret"
IP = {"REMOTE_ADDR": "203.0.113.7"}


def host_app(upstream: FakeChatKit, **config: Any) -> Flask:
    app = Flask("host")
    app.config.update(base_config(upstream, **config))
    return app


def limiter_for(storage: str, **kwargs: Any) -> Limiter:
    uri = "memory://" if storage == "memory" else REDIS_URL
    return Limiter(get_remote_address, storage_uri=uri, **kwargs)


def mints(app: Flask, n: int) -> list[int]:
    client = app.test_client()
    return [client.post(URL, json={}, environ_base=IP).status_code for _ in range(n)]


@pytest.fixture(params=["memory", "redis"])
def storage_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        request.getfixturevalue("real_redis")
    return request.param


# --- a handed-over limiter in every state -----------------------------------------------------


@pytest.mark.parametrize("order", ["limiter_first", "chatkit_first"])
@pytest.mark.parametrize("enabled", [True, False])
def test_handed_over_limiter_in_any_order_and_state(
    upstream: FakeChatKit, storage_kind: str, order: str, enabled: bool
) -> None:
    app = host_app(upstream, RATELIMIT_ENABLED=enabled, CHATKIT_RATELIMIT_PER_USER="2 per minute")
    limiter = limiter_for(storage_kind)
    if order == "limiter_first":
        limiter.init_app(app)
        ChatKit(app, limiter=limiter)
    else:
        ChatKit(app, limiter=limiter)
        limiter.init_app(app)
    assert ChatKit.state(app).limiter is limiter
    statuses = mints(app, 4)
    if enabled:
        assert statuses == [200, 200, 429, 429]
        assert upstream.count == 2
    else:
        assert statuses == [200] * 4  # RATELIMIT_ENABLED=False: no limits, no crash
    ready = app.test_client().get("/api/chatkit/static/chatkit-secret.js")
    assert ready.status_code == 200


def test_the_extensions_own_limiter_obeys_ratelimit_enabled(make_app: Callable[..., Flask]) -> None:
    app = make_app(RATELIMIT_ENABLED="false", CHATKIT_RATELIMIT_PER_USER="1 per minute")
    assert mints(app, 5) == [200] * 5
    limited = make_app(RATELIMIT_ENABLED="true", CHATKIT_RATELIMIT_PER_USER="1 per minute")
    assert mints(limited, 3) == [200, 429, 429]


def test_a_module_level_limiter_shared_by_several_apps_counts_each_request_once(
    upstream: FakeChatKit, real_redis: Any
) -> None:
    """The app-factory pattern: one Limiter and one ChatKit object, init_app per app."""
    limiter = limiter_for("redis")
    chatkit = ChatKit(limiter=limiter)
    apps = []
    for _ in range(3):
        app = host_app(upstream, CHATKIT_RATELIMIT_PER_USER="3 per minute")
        limiter.init_app(app)
        chatkit.init_app(app)
        apps.append(app)
    real_redis.flushdb()
    assert mints(apps[-1], 4) == [200, 200, 200, 429]


# --- Flask-Limiter's CLI and switches ----------------------------------------------------------


@pytest.mark.parametrize("handed_over", [False, True])
def test_flask_limiter_cli_lists_the_chats_limits(upstream: FakeChatKit, handed_over: bool) -> None:
    app = host_app(
        upstream,
        CHATKIT_RATELIMIT_PER_USER="7 per minute;70 per day",
        CHATKIT_RATELIMIT_PER_IP="31 per minute",
        CHATKIT_RATELIMIT_GLOBAL="999 per hour",
    )
    if handed_over:
        ChatKit(app, limiter=limiter_for("memory", app=app, default_limits=["5 per second"]))
    else:
        ChatKit(app)
    result = app.test_cli_runner().invoke(limiter_cli, ["limits"])
    assert result.exit_code == 0, result.output
    section = result.output.split("chatkit.secret", 1)[1].split("chatkit.static", 1)[0]
    for line in ("7 per 1 minute", "70 per 1 day", "31 per 1 minute", "999 per 1 hour"):
        assert line in section
    assert "Exempt" not in section


def test_flask_limiter_cli_shows_the_usage_of_a_key(make_app: Callable[..., Flask]) -> None:
    """Flask-Limiter's CLI leaves RATELIMIT_KEY_PREFIX out of the keys it reads (4.1.1), so the
    service ships without a prefix; ``flask chatkit usage`` honours one."""
    app = make_app(CHATKIT_RATELIMIT_PER_USER="off", CHATKIT_RATELIMIT_PER_IP="5 per minute")
    assert mints(app, 2) == [200, 200]
    result = app.test_cli_runner().invoke(
        limiter_cli, ["limits", "--endpoint", "chatkit.secret", "--key", "ip:203.0.113.7"]
    )
    assert result.exit_code == 0, result.output
    assert "3 out of 5 remaining" in result.output


def test_chatkit_cli_reports_the_handed_over_limiters_real_storage(
    upstream: FakeChatKit, real_redis: Any
) -> None:
    app = host_app(upstream, RATELIMIT_STORAGE_URI="memory://", RATELIMIT_KEY_PREFIX="cfg")
    limiter = Limiter(
        get_remote_address, storage_uri=REDIS_URL, key_prefix="hostprefix", app=app
    )
    ChatKit(app, limiter=limiter)
    output = app.test_cli_runner().invoke(args=["chatkit", "limits"]).output
    assert "storage:      " + REDIS_URL in output
    assert "key prefix:   hostprefix" in output
    check = app.test_cli_runner().invoke(args=["chatkit", "check"]).output
    assert f"{REDIS_URL} answers" in check


# --- a host's hooks and limits -----------------------------------------------------------------


def test_host_request_filter_exempts_the_chat(upstream: FakeChatKit) -> None:
    app = host_app(upstream, CHATKIT_RATELIMIT_PER_USER="1 per minute")
    limiter = limiter_for("memory", app=app)

    @limiter.request_filter
    def internal() -> bool:
        from flask import request

        return request.remote_addr == "10.1.1.1"

    ChatKit(app, limiter=limiter)
    client = app.test_client()
    inside = [
        client.post(URL, json={}, environ_base={"REMOTE_ADDR": "10.1.1.1"}).status_code
        for _ in "ab"
    ]
    assert inside == [200, 200]
    assert mints(app, 2) == [200, 429]


def test_host_on_breach_answers_and_its_default_limits_do_not_count_the_chat(
    upstream: FakeChatKit,
) -> None:
    breaches: list[RequestLimit] = []

    def on_breach(limit: RequestLimit) -> Any:
        breaches.append(limit)
        return None  # keep the extension's JSON answer

    app = host_app(upstream, CHATKIT_RATELIMIT_PER_USER="2 per minute")
    limiter = limiter_for("memory", app=app, default_limits=["1 per minute"], on_breach=on_breach)

    @app.get("/page")
    def page() -> Any:
        return jsonify(ok=True)

    ChatKit(app, limiter=limiter)
    # The host's default "1 per minute" does not apply on top of the chat's own limits.
    chat = app.test_client()
    statuses = [chat.post(URL, json={}, environ_base=IP).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert len(breaches) == 1 and breaches[0].limit.amount == 2
    body = chat.post(URL, json={}, environ_base=IP).get_json()
    assert body["error"] == "rate_limited" and body["scope"] == "user"
    client = app.test_client()
    assert [client.get("/page").status_code for _ in "ab"] == [200, 429]


def test_host_on_breach_response_is_used(upstream: FakeChatKit) -> None:
    def on_breach(_limit: RequestLimit) -> Any:
        return make_response(jsonify(custom="slow down"), 429)

    app = host_app(upstream, CHATKIT_RATELIMIT_PER_USER="1 per minute")
    limiter = limiter_for("memory", app=app, on_breach=on_breach)
    ChatKit(app, limiter=limiter)
    client = app.test_client()
    client.post(URL, json={}, environ_base=IP)
    response = client.post(URL, json={}, environ_base=IP)
    assert response.status_code == 429
    assert response.get_json() == {"custom": "slow down"}


def test_host_application_limits_count_the_chat_too(upstream: FakeChatKit) -> None:
    app = host_app(upstream, RATELIMIT_APPLICATION="3 per minute")
    ChatKit(app, limiter=limiter_for("memory", app=app))

    @app.get("/page")
    def page() -> Any:
        return jsonify(ok=True)

    client = app.test_client()
    assert client.get("/page", environ_base=IP).status_code == 200
    assert [client.post(URL, json={}, environ_base=IP).status_code for _ in "ab"] == [200, 200]
    refused = client.post(URL, json={}, environ_base=IP)
    assert refused.status_code == 429
    assert refused.get_json()["scope"] == "site"  # a limit of the host's, not the chat's
    assert refused.get_json()["request_id"]


# --- exactness and storage faults on a handed-over limiter -------------------------------------


def test_handed_over_limiter_is_exact_under_concurrency(
    upstream: FakeChatKit, real_redis: Any
) -> None:
    app = host_app(upstream, CHATKIT_RATELIMIT_PER_IP="10 per minute")
    ChatKit(app, limiter=limiter_for("redis", app=app))
    barrier = threading.Barrier(30)

    def one(_: int) -> int:
        client = app.test_client()
        barrier.wait(timeout=10)
        return client.post(URL, json={}, environ_base=IP).status_code

    with ThreadPoolExecutor(30) as pool:
        statuses = list(pool.map(one, range(30)))
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    assert upstream.count == 10


@pytest.mark.parametrize("order", ["limiter_first", "chatkit_first"])
@pytest.mark.parametrize("fault", ["refused", "hung"])
def test_a_dead_redis_behind_a_handed_over_limiter_never_stalls_or_500s(
    upstream: FakeChatKit, hung_redis: str, order: str, fault: str
) -> None:
    uri = "redis://127.0.0.1:1/0" if fault == "refused" else hung_redis
    app = host_app(
        upstream, CHATKIT_REDIS_TIMEOUT=0.3, CHATKIT_RATELIMIT_PER_USER="3 per minute"
    )
    limiter = Limiter(get_remote_address, storage_uri=uri, in_memory_fallback_enabled=True)

    @app.get("/page")
    @limiter.limit("100 per minute")
    def page() -> Any:
        return jsonify(ok=True)

    if order == "limiter_first":
        limiter.init_app(app)
        ChatKit(app, limiter=limiter)
    else:
        ChatKit(app, limiter=limiter)
        limiter.init_app(app)
    client = app.test_client()
    durations, statuses = [], []
    for _ in range(4):
        started = time.monotonic()
        statuses.append(client.post(URL, json={}, environ_base=IP).status_code)
        durations.append(time.monotonic() - started)
    started = time.monotonic()
    assert client.get("/page").status_code == 200  # a host route: no 500 either
    durations.append(time.monotonic() - started)
    assert statuses == [200, 200, 200, 429]  # the fallback keeps the limits
    assert max(durations) < 1.0, durations


def test_without_fallback_a_dead_redis_is_a_503_json_from_a_handed_over_limiter(
    upstream: FakeChatKit,
) -> None:
    app = host_app(upstream, CHATKIT_REDIS_TIMEOUT=0.3)
    limiter = Limiter(get_remote_address, storage_uri="redis://127.0.0.1:1/0", app=app)
    ChatKit(app, limiter=limiter)
    response = app.test_client().post(URL, json={}, environ_base=IP)
    assert response.status_code == 503
    assert response.get_json()["error"] == "limiter_unavailable"
    assert upstream.count == 0


# --- a good guest: clashes fail clearly and leave nothing behind --------------------------------


def _registered(app: Flask) -> tuple[set[str], set[str], set[str]]:
    return set(app.blueprints), {r.rule for r in app.url_map.iter_rules()}, set(app.extensions)


def test_a_blueprint_named_chatkit_is_refused_and_nothing_is_registered(
    upstream: FakeChatKit,
) -> None:
    from flask import Blueprint

    app = host_app(upstream)
    app.register_blueprint(Blueprint("chatkit", __name__, url_prefix="/mine"))
    before = _registered(app)
    with pytest.raises(RuntimeError, match="blueprint named 'chatkit'"):
        ChatKit(app)
    assert _registered(app) == before


def test_a_route_under_the_prefix_is_refused(upstream: FakeChatKit) -> None:
    app = host_app(upstream)

    @app.post("/api/chatkit/secret")
    def mine() -> str:
        return "mine"

    before = _registered(app)
    with pytest.raises(ConfigError) as info:
        ChatKit(app)
    assert info.value.key == "CHATKIT_URL_PREFIX"
    assert _registered(app) == before
    ChatKit(host_app(upstream, CHATKIT_URL_PREFIX="/chat"))  # another prefix works


def test_an_existing_flask_chatkit_command_is_refused(upstream: FakeChatKit) -> None:
    import click

    app = host_app(upstream)
    app.cli.add_command(click.Group("chatkit"))
    with pytest.raises(RuntimeError, match="flask chatkit"):
        ChatKit(app)
    assert "chatkit" not in app.extensions


def test_the_session_cookie_name_is_refused(upstream: FakeChatKit) -> None:
    app = host_app(upstream, CHATKIT_COOKIE_NAME="session")
    with pytest.raises(ConfigError) as info:
        ChatKit(app)
    assert info.value.key == "CHATKIT_COOKIE_NAME"


def test_a_failed_init_app_can_be_retried_after_fixing_the_config(upstream: FakeChatKit) -> None:
    app = host_app(upstream, CHATKIT_RATELIMIT_PER_USER="0 per minute")
    with pytest.raises(ConfigError):
        ChatKit(app)
    assert "chatkit" not in app.extensions and "limiter" not in app.extensions
    app.config["CHATKIT_RATELIMIT_PER_USER"] = "off"
    ChatKit(app)
    assert mints(app, 1) == [200]
