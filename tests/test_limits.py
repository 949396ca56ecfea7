"""Rate limits: per visitor, per IP, global; on fakeredis and on the real Redis server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask

from chatkit_flask.limits import fallback_active
from chatkit_flask.testing.fake_chatkit import FakeChatKit

URL = "/api/chatkit/secret"


def post(app: Flask, *, ip: str = "203.0.113.7", client: Any = None, **kwargs: Any) -> Any:
    client = client or app.test_client()
    return client.post(URL, json={}, environ_base={"REMOTE_ADDR": ip}, **kwargs)


def test_per_visitor_limit(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(**storage, CHATKIT_RATELIMIT_PER_USER="3 per minute")
    client = app.test_client()
    statuses = [post(app, client=client).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    response = post(app, client=client)
    assert response.status_code == 429
    body = response.get_json()
    assert body["error"] == "rate_limited"
    assert body["scope"] == "user"
    assert 1 <= body["retry_after"] <= 61
    assert response.headers["Retry-After"] == str(body["retry_after"])
    assert str(body["retry_after"]) in body["message"]
    assert upstream.count == 3  # the rejected request never reached the upstream
    # Another visitor from the same IP still gets through.
    assert post(app).status_code == 200


def test_rate_limit_headers_are_flask_limiters(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    """With RATELIMIT_HEADERS_ENABLED, Flask-Limiter writes its headers as it documents them:
    the shortest window's limit, and Retry-After on every response."""
    app = make_app(
        **storage, CHATKIT_RATELIMIT_PER_USER="5 per minute", RATELIMIT_HEADERS_ENABLED=True
    )
    client = app.test_client()
    post(app, client=client)
    response = post(app, client=client)
    assert response.headers["X-RateLimit-Limit"] == "5"
    assert response.headers["X-RateLimit-Remaining"] == "3"
    assert int(response.headers["X-RateLimit-Reset"]) > time.time()
    assert 0 <= int(response.headers["Retry-After"]) <= 61
    for _ in range(4):
        refused = post(app, client=client)
    assert refused.status_code == 429
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert abs(int(refused.headers["Retry-After"]) - refused.get_json()["retry_after"]) <= 1


def test_rotating_or_dropping_cookies_still_meets_the_ip_limit(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(**storage, CHATKIT_RATELIMIT_PER_IP="4 per minute")
    statuses = [post(app).status_code for _ in range(6)]  # a fresh client: no cookie each time
    assert statuses == [200] * 4 + [429] * 2
    assert post(app).get_json()["scope"] == "ip"
    assert post(app, ip="198.51.100.1").status_code == 200
    assert upstream.count == 5


def test_global_cap_across_ips(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(**storage, CHATKIT_RATELIMIT_GLOBAL="3 per minute")
    statuses = [post(app, ip=f"192.0.2.{i}").status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert post(app, ip="192.0.2.99").get_json()["scope"] == "global"


def test_a_visitor_over_their_limit_does_not_spend_the_global_cap(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(
        **storage,
        CHATKIT_RATELIMIT_PER_USER="1 per minute",
        CHATKIT_RATELIMIT_GLOBAL="3 per minute",
    )
    greedy = app.test_client()
    assert [post(app, client=greedy, ip="192.0.2.1").status_code for _ in range(4)] == [
        200,
        429,
        429,
        429,
    ]
    assert post(app, ip="192.0.2.2").status_code == 200
    assert post(app, ip="192.0.2.3").status_code == 200
    assert post(app, ip="192.0.2.4").get_json()["scope"] == "global"


def test_several_windows_in_one_limit(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(**storage, CHATKIT_RATELIMIT_PER_USER="5 per minute;2 per hour")
    client = app.test_client()
    assert [post(app, client=client).status_code for _ in range(3)] == [200, 200, 429]


def test_concurrent_requests_admit_exactly_the_limit(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(**storage, CHATKIT_RATELIMIT_PER_IP="10 per minute")
    barrier = threading.Barrier(16)

    def one(_: int) -> int:
        client = app.test_client()
        barrier.wait(timeout=10)
        return post(app, client=client).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(16))) + list(
            pool.map(lambda _: post(app).status_code, range(14))
        )
    assert statuses.count(200) == 10
    assert statuses.count(429) == 20
    assert upstream.count == 10


def test_x_forwarded_for_is_ignored_without_trusted_proxies(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(**storage, CHATKIT_RATELIMIT_PER_IP="2 per minute")
    statuses = [post(app, headers={"X-Forwarded-For": f"10.9.9.{i}"}).status_code for i in range(4)]
    assert statuses == [200, 200, 429, 429]


def test_x_forwarded_for_is_honoured_through_the_trusted_proxy_only(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(
        **storage,
        CHATKIT_RATELIMIT_PER_IP="2 per minute",
        CHATKIT_TRUSTED_PROXIES=1,
        CHATKIT_TRUSTED_PROXY_NETWORKS="10.0.0.0/24",
    )
    proxy = "10.0.0.2"

    def via_proxy(forwarded: str) -> int:
        return post(app, ip=proxy, headers={"X-Forwarded-For": forwarded}).status_code

    assert [via_proxy("198.51.100.10") for _ in range(3)] == [200, 200, 429]
    assert via_proxy("198.51.100.11") == 200  # another real client
    # A client that prepends a fake address is still keyed on what the proxy saw.
    assert via_proxy("1.2.3.4, 198.51.100.10") == 429
    # A client connecting directly (not from the proxy network) cannot pick its address.
    direct = [
        post(app, ip="203.0.113.50", headers={"X-Forwarded-For": f"192.0.2.{i}"}).status_code
        for i in range(3)
    ]
    assert direct == [200, 200, 429]


def test_forwarded_headers_never_rewrite_host_routes(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    app = make_app(CHATKIT_TRUSTED_PROXIES=1, CHATKIT_TRUSTED_PROXY_NETWORKS="10.0.0.0/24")

    @app.get("/whoami")
    def whoami() -> dict:
        from flask import request

        return {"addr": request.remote_addr, "scheme": request.scheme}

    seen = app.test_client().get(
        "/whoami",
        environ_base={"REMOTE_ADDR": "10.0.0.2"},
        headers={"X-Forwarded-For": "198.51.100.10", "X-Forwarded-Proto": "https"},
    )
    assert seen.get_json() == {"addr": "10.0.0.2", "scheme": "http"}


def test_ipv6_clients_are_limited_per_64(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(**storage, CHATKIT_RATELIMIT_PER_IP="2 per minute")
    assert post(app, ip="2001:db8:1:2::1").status_code == 200
    assert post(app, ip="2001:db8:1:2:ffff::9").status_code == 200
    assert post(app, ip="2001:db8:1:2:aaaa::1").status_code == 429  # same /64
    assert post(app, ip="2001:db8:1:3::1").status_code == 200  # another /64


def test_limits_are_shared_between_app_instances(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    """Two app objects on one storage stand in for two workers or hosts."""
    first = make_app(**storage, CHATKIT_RATELIMIT_PER_IP="3 per minute")
    second = make_app(**storage, CHATKIT_RATELIMIT_PER_IP="3 per minute")
    statuses = [post(app).status_code for app in (first, second, first, second)]
    assert statuses == [200, 200, 200, 429]


def test_redis_keys_hold_no_raw_visitor_id(
    make_app: Callable[..., Flask], real_redis: Any, upstream: FakeChatKit
) -> None:
    from tests.conftest import REDIS_URL

    app = make_app(RATELIMIT_STORAGE_URI=REDIS_URL)
    post(app)
    visitor_id = upstream.last.json["user"].removeprefix("visitor_")
    keys = [key.decode() for key in real_redis.keys("*")]
    assert any("/visitor:" in key for key in keys)
    assert any("/ip:203.0.113.7/" in key for key in keys)
    assert not any(visitor_id in key for key in keys)


# --- storage failures -------------------------------------------------------------------------


@pytest.mark.parametrize("uri_kind", ["refused", "hung"])
def test_storage_down_falls_back_to_memory_without_500_or_stall(
    make_app: Callable[..., Flask], upstream: FakeChatKit, hung_redis: str, uri_kind: str
) -> None:
    uri = "redis://127.0.0.1:1/0" if uri_kind == "refused" else hung_redis
    app = make_app(RATELIMIT_STORAGE_URI=uri, CHATKIT_RATELIMIT_PER_USER="3 per minute")
    client = app.test_client()
    started = time.monotonic()
    statuses = [post(app, client=client).status_code for _ in range(4)]
    elapsed = time.monotonic() - started
    assert statuses == [200, 200, 200, 429]  # the fallback still applies the limits
    assert elapsed < 2.0  # one Redis timeout (0.3 s) at most, not 5 s per request
    assert app.test_client().get("/readyz").status_code == 503
    assert app.test_client().get("/healthz").status_code == 200


def test_fakeredis_outage_then_recovery(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    from tests.conftest import fakeredis_config

    config = fakeredis_config()
    server = config["_fake_server"]
    app = make_app(**config, CHATKIT_RATELIMIT_PER_USER="3 per minute")
    client = app.test_client()
    state = app.extensions["chatkit"]
    assert post(app, client=client).status_code == 200
    server.connected = False
    # In memory from here: the visitor's count starts afresh in this process, and still holds.
    assert [post(app, client=client).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert fallback_active(state.limiter) is True
    assert app.test_client().get("/readyz").status_code == 503
    server.connected = True
    assert app.test_client().get("/readyz").status_code == 200
    time.sleep(1.1)  # the storage is probed again after 1 s, then 2, 4, ... 32 s
    # Back in Redis, where the visitor had used 1 of 3 before the outage.
    assert [post(app, client=client).status_code for _ in range(3)] == [200, 200, 429]
    assert fallback_active(state.limiter) is False


def test_without_fallback_or_swallow_a_dead_storage_answers_503_and_never_calls_upstream(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    app = make_app(
        RATELIMIT_STORAGE_URI="redis://127.0.0.1:1/0", RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=False
    )
    response = post(app)
    assert response.status_code == 503
    body = response.get_json()
    assert body["error"] == "limiter_unavailable"
    assert response.headers["Retry-After"] == "5"
    assert upstream.count == 0


def test_swallow_errors_lets_requests_through_when_the_storage_fails(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    app = make_app(
        RATELIMIT_STORAGE_URI="redis://127.0.0.1:1/0",
        RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=False,
        RATELIMIT_SWALLOW_ERRORS=True,
        CHATKIT_RATELIMIT_PER_USER="1 per minute",
    )
    client = app.test_client()
    assert [post(app, client=client).status_code for _ in range(3)] == [200, 200, 200]


def test_health_endpoints_are_not_rate_limited(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(**storage, CHATKIT_RATELIMIT_GLOBAL="1 per minute")
    client = app.test_client()
    for _ in range(5):
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_host_app_can_hand_over_its_own_limiter(upstream: FakeChatKit) -> None:
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    from chatkit_flask import ChatKit
    from tests.conftest import base_config

    app = Flask("host")
    app.config.update(base_config(upstream, CHATKIT_RATELIMIT_PER_USER="2 per minute"))
    limiter = Limiter(get_remote_address, app=app, storage_uri="memory://")

    @app.get("/products")
    @limiter.limit("1 per minute")
    def products() -> str:
        return "ok"

    chatkit = ChatKit(app, limiter=limiter)
    assert ChatKit.state(app).limiter is limiter
    client = app.test_client()
    assert [client.post(URL, json={}).status_code for _ in range(3)] == [200, 200, 429]
    assert client.post(URL, json={}).get_json()["error"] == "rate_limited"
    assert [client.get("/products").status_code for _ in range(2)] == [200, 429]
    assert chatkit is not None


# --- Flask-Limiter's evaluation ---------------------------------------------------------------


def test_a_request_refused_by_the_ip_limit_has_counted_against_the_visitor_limit(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    """Flask-Limiter hits each limit in turn (per user before per IP within a window) and stops
    at the first breach: a request the per-IP limit refuses has already spent one of the
    visitor's own. The README says so."""
    app = make_app(
        **storage,
        CHATKIT_RATELIMIT_PER_USER="5 per minute",
        CHATKIT_RATELIMIT_PER_IP="2 per minute",
    )
    client = app.test_client()
    assert [post(app, client=client).status_code for _ in range(4)] == [200, 200, 429, 429]
    assert upstream.count == 2
    # From another IP the same visitor has 5 - 4 = 1 left.
    statuses = [post(app, client=client, ip="198.51.100.9").status_code for _ in range(3)]
    assert statuses == [200, 429, 429]
    assert post(app, client=client, ip="198.51.100.9").get_json()["scope"] == "user"


def test_headers_describe_the_shortest_window(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    app = make_app(
        **storage,
        CHATKIT_RATELIMIT_PER_USER="10 per minute",
        CHATKIT_RATELIMIT_PER_IP="3 per hour",
        RATELIMIT_HEADERS_ENABLED=True,
    )
    response = post(app)
    assert response.headers["X-RateLimit-Limit"] == "10"
    assert response.headers["X-RateLimit-Remaining"] == "9"


def test_headers_are_off_by_default_as_in_flask_limiter(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    from chatkit_flask.extension import ChatKit
    from tests.conftest import base_config

    host = Flask("host")
    host.config.update(base_config(upstream, **storage))
    host.config.pop("_fake_server", None)
    ChatKit(host)
    response = host.test_client().post(URL, json={}, environ_base={"REMOTE_ADDR": "203.0.113.7"})
    assert response.status_code == 200
    assert not [name for name, _ in response.headers if name.startswith("X-RateLimit")]
    assert "Retry-After" not in response.headers


def test_redis_round_trips_are_flask_limiters_own(
    make_app: Callable[..., Flask],
    real_redis: Any,
    upstream: FakeChatKit,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One atomic hit per limit item while admitted; on a refusal, the hits up to the breach
    and one read of the breached window for Retry-After. Nothing else."""
    import redis

    from tests.conftest import REDIS_URL

    app = make_app(
        RATELIMIT_STORAGE_URI=REDIS_URL,
        CHATKIT_RATELIMIT_PER_USER="3 per minute",
        CHATKIT_RATELIMIT_GLOBAL="off",
    )
    client = app.test_client()
    post(app, client=client)  # the first call loads the script
    sent: list[str] = []
    original = redis.Redis.execute_command

    def counting(self: redis.Redis, *args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return original(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", counting)
    assert post(app, client=client).status_code == 200
    # 3 limit items: the visitor's per minute, the IP's per minute and per day.
    assert sent == ["EVALSHA"] * 3
    sent.clear()
    post(app, client=client)
    sent.clear()
    assert post(app, client=client).status_code == 429
    assert sent[0] == "EVALSHA" and sent.count("EVALSHA") == 1  # stopped at the visitor's limit
    assert len(sent) <= 3  # plus the window read for Retry-After


@pytest.mark.parametrize("strategy", ["moving-window", "sliding-window-counter"])
def test_other_strategies_limit_through_limits(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit, strategy: str
) -> None:
    app = make_app(
        **storage, RATELIMIT_STRATEGY=strategy, CHATKIT_RATELIMIT_PER_USER="2 per minute"
    )
    client = app.test_client()
    responses = [post(app, client=client) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[2].get_json()["scope"] == "user"
    assert 1 <= responses[2].get_json()["retry_after"] <= 60
    assert upstream.count == 2


# --- IPv6 /48 aggregate and the default global cap --------------------------------------------


def test_one_ipv6_48_shares_one_budget_across_its_64s(
    make_app: Callable[..., Flask], storage: dict, upstream: FakeChatKit
) -> None:
    """Each /64 has its own per-IP budget; a /48 holds 65,536 of them, so it has one too."""
    app = make_app(
        **storage,
        CHATKIT_RATELIMIT_PER_IP="2 per minute",
        CHATKIT_RATELIMIT_PER_IPV6_48="3 per minute",
    )
    assert [post(app, ip=f"2001:db8:1:{n}::1").status_code for n in range(3)] == [200] * 3
    refused = post(app, ip="2001:db8:1:ffff::1")  # a fresh /64, same /48
    assert refused.status_code == 429
    assert refused.get_json()["scope"] == "net48"
    assert post(app, ip="2001:db8:2::1").status_code == 200  # the next /48
    # IPv4 clients (and IPv4-mapped addresses) are not counted by it.
    assert [post(app, ip=f"198.51.100.{n}").status_code for n in range(4)] == [200] * 4
    assert post(app, ip="::ffff:198.51.100.9").status_code == 200
    assert upstream.count == 9


def test_the_48_counter_is_keyed_net48(
    make_app: Callable[..., Flask], real_redis: Any, upstream: FakeChatKit
) -> None:
    from tests.conftest import REDIS_URL

    app = make_app(RATELIMIT_STORAGE_URI=REDIS_URL)
    post(app, ip="2001:db8:abcd:12::7")
    keys = [key.decode() for key in real_redis.keys("*")]
    assert any("/net48:2001:db8:abcd::/48/" in key for key in keys), keys
    real_redis.flushdb()
    post(app, ip="203.0.113.8")
    assert not any("net48" in key.decode() for key in real_redis.keys("*"))


def test_server_mode_messages_count_against_the_48(tmp_path: Any) -> None:
    """Server mode's message limits come from the same rules: the /48 caps messages, not reads."""
    from chatkit_flask.service import create_app
    from chatkit_flask.testing.fake_responses import FakeResponses
    from tests.conftest import TEST_SECRET_KEY

    with FakeResponses() as fake:
        app = create_app(
            {
                "CHATKIT_BACKEND": "server",
                "OPENAI_API_KEY": "test-model-key",
                "OPENAI_BASE_URL": fake.base_url,
                "CHATKIT_TITLE_MODEL": "off",  # one model call per message
                "SECRET_KEY": TEST_SECRET_KEY,
                "CHATKIT_STORE_URL": f"sqlite:///{tmp_path / 'threads.db'}",
                "CHATKIT_AGENT_INSTRUCTIONS": "Be brief.",
                "CHATKIT_COOKIE_SECURE": False,
                "CHATKIT_RATELIMIT_PER_IPV6_48": "1 per minute",
                "TESTING": True,
            },
            environ={},
        )

        def send(ip: str, kind: str) -> Any:
            params: dict[str, Any] = {}
            if kind == "threads.create":
                text = {"type": "input_text", "text": "hi"}
                params = {"input": {"content": [text], "attachments": [], "inference_options": {}}}
            return app.test_client().post(
                "/api/chatkit",
                json={"type": kind, "params": params},
                environ_base={"REMOTE_ADDR": ip},
            )

        assert b'"type": "error"' not in send("2001:db8:5:1::1", "threads.create").data
        refused = send("2001:db8:5:2::1", "threads.create")  # another /64 of the /48
        assert b"Too many messages came from your network" in refused.data
        assert refused.headers["Retry-After"]
        assert send("2001:db8:5:3::1", "threads.list").status_code == 200  # reads: not counted
        assert fake.count == 1


def test_default_limits_include_the_48_and_a_global_cap(upstream: FakeChatKit) -> None:
    from chatkit_flask.settings import Settings
    from tests.conftest import base_config

    config = base_config(upstream)
    settings = Settings.from_mapping(config)
    assert settings.limit_per_ipv6_48 == "60 per minute;200 per day"
    assert settings.limit_global == "2000 per day"
    off = Settings.from_mapping(
        {**config, "CHATKIT_RATELIMIT_GLOBAL": "off", "CHATKIT_RATELIMIT_PER_IPV6_48": "off"}
    )
    assert (off.limit_global, off.limit_per_ipv6_48) == ("", "")
