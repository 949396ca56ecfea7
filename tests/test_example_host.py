"""A host app's own tests, written with ``chatkit_flask.testing`` as the README's "Testing your
app" shows: the fake ChatKit API fixture and limits off through RATELIMIT_ENABLED=False."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask_wtf.csrf import CSRFProtect

from chatkit_flask import ChatKit
from chatkit_flask.testing import FakeChatKit, chatkit_test_config, reset_limits
from tests.example_host import create_app

URL = "/api/chatkit/secret"


@pytest.fixture
def app(chatkit_api: FakeChatKit) -> Flask:
    return create_app(chatkit_test_config(chatkit_api, SECRET_KEY="host-secret-" + "x" * 32))


def test_test_config_runs_without_limits_and_without_a_crash(
    app: Flask, chatkit_api: FakeChatKit
) -> None:
    client = app.test_client()
    statuses = [client.post(URL, json={}).status_code for _ in range(15)]
    assert statuses == [200] * 15  # 15 > the default 10 per minute
    assert chatkit_api.count == 15
    assert [client.get("/shop").status_code for _ in range(3)] == [200] * 3


def test_a_signed_in_user_chats_as_themselves(app: Flask, chatkit_api: FakeChatKit) -> None:
    client = app.test_client()
    assert client.post("/login", data={"user": "ada"}).status_code == 200
    assert client.post(URL, json={}).status_code == 200
    assert chatkit_api.last.json["user"] == "user_ada"
    anonymous = app.test_client()
    anonymous.post(URL, json={})
    assert chatkit_api.last.json["user"].startswith("visitor_")


def test_limits_on_in_a_test_and_reset_between(chatkit_api: FakeChatKit) -> None:
    app = create_app(
        chatkit_test_config(
            chatkit_api,
            SECRET_KEY="host-secret-" + "x" * 32,
            RATELIMIT_ENABLED=True,
            CHATKIT_RATELIMIT_PER_USER="2 per minute",
        )
    )
    client = app.test_client()
    assert [client.post(URL, json={}).status_code for _ in range(3)] == [200, 200, 429]
    reset_limits(app)
    assert client.post(URL, json={}).status_code == 200


def test_without_the_exempt_line_csrf_refuses_with_a_clear_error(
    chatkit_api: FakeChatKit,
) -> None:
    app = Flask("no_exempt")
    app.config.update(chatkit_test_config(chatkit_api, SECRET_KEY="s" * 40))
    CSRFProtect(app)
    ChatKit(app)
    response = app.test_client().post(URL, json={})
    assert response.status_code == 400
    body: dict[str, Any] = response.get_json()
    assert body["error"] == "csrf_failed"
    assert "csrf.exempt(app.blueprints['chatkit'])" in body["message"]
    assert body["request_id"]
    assert chatkit_api.count == 0
