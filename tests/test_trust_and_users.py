"""Hardening, second round, items 5 and 6: forwarded headers are trusted only from the proxy
networks (never for /metrics), and a user_loader's "nobody" values never make a shared user."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from chatkit_flask import ChatKit
from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.conftest import base_config

URL = "/api/chatkit/secret"


def test_forwarded_for_from_a_direct_client_does_not_dodge_the_ip_limit(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    """CHATKIT_TRUSTED_PROXIES=1 used to apply X-Forwarded-For from anyone: rotating it gave
    every request a fresh per-IP budget."""
    app = make_app(
        CHATKIT_RATELIMIT_PER_IP="3 per minute",
        CHATKIT_TRUSTED_PROXIES=1,
        CHATKIT_TRUSTED_PROXY_NETWORKS="10.203.47.0/24",
    )
    statuses = [
        app.test_client()
        .post(URL, json={}, environ_base={"REMOTE_ADDR": "198.51.100.77"},
              headers={"X-Forwarded-For": f"203.0.113.{n}"})
        .status_code
        for n in range(6)
    ]  # fmt: skip
    assert statuses == [200, 200, 200, 429, 429, 429]


def test_metrics_checks_the_real_connecting_address(make_app: Callable[..., Flask]) -> None:
    app = make_app(
        CHATKIT_TRUSTED_PROXIES=1,
        CHATKIT_TRUSTED_PROXY_NETWORKS="0.0.0.0/0",  # even a proxy network this wide
        CHATKIT_METRICS_ALLOW="127.0.0.0/8",
    )
    outside = app.test_client().get(
        "/metrics",
        environ_base={"REMOTE_ADDR": "198.51.100.77"},
        headers={"X-Forwarded-For": "127.0.0.1"},
    )
    assert outside.status_code == 403
    inside = app.test_client().get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert inside.status_code == 200


@pytest.mark.parametrize("nobody", [False, 0, "", "   ", None, 0.0, object(), [], {"id": 1}])
def test_a_loader_returning_nobody_leaves_visitors_apart(
    upstream: FakeChatKit, nobody: Any
) -> None:
    app = Flask("host")
    app.config.update(base_config(upstream))
    chatkit = ChatKit(app)
    chatkit.user_loader(lambda: nobody)
    for _ in range(2):
        assert app.test_client().post(URL, json={}).status_code == 200
    users = [r.json["user"] for r in upstream.requests]
    assert all(user.startswith("visitor_") for user in users)
    assert users[0] != users[1]  # two anonymous visitors, not one shared user


@pytest.mark.parametrize(("given", "sent"), [("ada", "user_ada"), (42, "user_42")])
def test_signed_in_ids_get_a_prefix_no_visitor_can_have(
    upstream: FakeChatKit, given: Any, sent: str
) -> None:
    app = Flask("host")
    app.config.update(base_config(upstream))
    ChatKit(app).user_loader(lambda: given)
    assert app.test_client().post(URL, json={}).status_code == 200
    assert upstream.last.json["user"] == sent


def test_a_user_named_like_a_visitor_is_not_that_visitor(upstream: FakeChatKit) -> None:
    app = Flask("host")
    app.config.update(base_config(upstream, CHATKIT_RATELIMIT_PER_USER="1 per minute"))
    ChatKit(app)
    visitor = app.test_client()
    assert visitor.post(URL, json={}).status_code == 200
    visitor_user = upstream.last.json["user"]
    impostor = Flask("host2")
    impostor.config.update(base_config(upstream, CHATKIT_RATELIMIT_PER_USER="1 per minute"))
    ChatKit(impostor).user_loader(lambda: visitor_user)
    assert impostor.test_client().post(URL, json={}).status_code == 200
    assert upstream.last.json["user"] == "user_" + visitor_user


@pytest.mark.parametrize("path", [URL, "/api/chatkit/config"])
def test_a_preflight_sets_no_visitor_cookie(make_app: Callable[..., Flask], path: str) -> None:
    app = make_app(CHATKIT_ALLOWED_ORIGINS="https://shop.example.test")
    response = app.test_client().options(
        path,
        headers={
            "Origin": "https://shop.example.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example.test"
    assert "Set-Cookie" not in response.headers
