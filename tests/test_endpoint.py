"""POST /api/chatkit/secret: the contract a frontend relies on, against a fake ChatKit API
served on a real loopback socket."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from chatkit_flask import ChatKit
from chatkit_flask.testing.fake_chatkit import Behaviour, FakeChatKit
from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY, WORKFLOW, base_config

URL = "/api/chatkit/secret"
COOKIE = "chatkit_session_id"


def visitor_cookie(client: FlaskClient) -> str | None:
    cookie = client.get_cookie(COOKIE)
    return cookie.value if cookie else None


def test_mint_returns_secret_and_real_expiry(client: FlaskClient, upstream: FakeChatKit) -> None:
    before = int(time.time())
    response = client.post(URL, json={})
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"client_secret", "expires_at", "expires_after"}
    assert body["client_secret"].startswith("ek_fake_")
    assert before + 600 <= body["expires_at"] <= int(time.time()) + 600
    assert 598 <= body["expires_after"] <= 600
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Request-ID"]
    assert "Retry-After" not in response.headers
    assert upstream.count == 1


def test_upstream_call_carries_key_beta_header_and_server_chosen_fields(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    app = make_app(
        CHATKIT_SESSION_TTL=120,
        CHATKIT_WORKFLOW_VERSION="7",
        CHATKIT_SESSION_RATE_LIMIT=20,
        CHATKIT_FILE_UPLOAD_ENABLED="true",
        CHATKIT_HISTORY_ENABLED="false",
    )
    assert app.test_client().post(URL, json={}).status_code == 200
    sent = upstream.last
    assert sent.path == "/v1/chatkit/sessions"
    assert sent.headers["authorization"] == f"Bearer {TEST_API_KEY}"
    assert sent.headers["openai-beta"] == "chatkit_beta=v1"
    assert sent.json["workflow"] == {"id": WORKFLOW, "version": "7"}
    assert sent.json["expires_after"] == {"anchor": "created_at", "seconds": 120}
    assert sent.json["rate_limits"] == {"max_requests_per_1_minute": 20}
    assert sent.json["chatkit_configuration"] == {
        "file_upload": {"enabled": True},
        "history": {"enabled": False},
    }
    assert sent.json["user"].startswith("visitor_")


def test_new_visitor_gets_a_signed_httponly_cookie(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    client = make_app(CHATKIT_COOKIE_SECURE=True).test_client()
    response = client.post(URL, json={}, base_url="https://localhost")
    set_cookie = response.headers["Set-Cookie"]
    assert set_cookie.startswith(f"__Host-{COOKIE}=")  # Secure: the __Host- name
    for attribute in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age=2592000"):
        assert attribute in set_cookie
    visitor_id = upstream.last.json["user"].removeprefix("visitor_")
    cookie_value = set_cookie.split(";")[0].split("=", 1)[1]
    assert cookie_value.startswith(visitor_id + ".")  # id, timestamp, signature
    assert cookie_value != visitor_id


def test_returning_visitor_keeps_the_same_user(client: FlaskClient, upstream: FakeChatKit) -> None:
    client.post(URL, json={})
    first_user = upstream.last.json["user"]
    response = client.post(URL, json={})
    assert "Set-Cookie" not in response.headers  # nothing new to set
    assert upstream.last.json["user"] == first_user
    assert upstream.count == 2


@pytest.mark.parametrize(
    "forged",
    [
        "attacker-chosen-user",
        "AAAAAAAAAAAAAAAAAAAAAA.AAAAAA.AAAA",
        "x" * 5000,
        "",
        "\u00e9\u00e9.\u00e9",
    ],
)
@pytest.mark.filterwarnings("ignore:The 'chatkit_session_id' cookie is too large")
def test_forged_cookie_is_replaced_and_never_sent_upstream(
    client: FlaskClient, upstream: FakeChatKit, forged: str
) -> None:
    client.set_cookie(COOKIE, forged)
    response = client.post(URL, json={})
    assert response.status_code == 200
    user = upstream.last.json["user"]
    assert forged not in user or forged == ""
    assert user.startswith("visitor_") and len(user) == len("visitor_") + 22
    assert f"{COOKIE}=" in response.headers["Set-Cookie"]


def test_tampered_signature_gets_a_fresh_identity(
    client: FlaskClient, upstream: FakeChatKit
) -> None:
    client.post(URL, json={})
    original_user = upstream.last.json["user"]
    value = visitor_cookie(client)
    assert value
    victim_id = "B" * 22  # try to claim another visitor's id with the old signature
    client.set_cookie(COOKIE, victim_id + value[22:])
    client.post(URL, json={})
    assert upstream.last.json["user"] not in {f"visitor_{victim_id}", original_user}


def test_cookie_signed_with_another_key_is_rejected(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    other = make_app(SECRET_KEY="another-secret").test_client()
    other.post(URL, json={})
    foreign = visitor_cookie(other)
    foreign_user = upstream.last.json["user"]
    client = make_app().test_client()
    client.set_cookie(COOKIE, foreign)
    client.post(URL, json={})
    assert upstream.last.json["user"] != foreign_user


@pytest.mark.parametrize(
    "body",
    [
        {"workflow_id": WORKFLOW},
        {"workflow": {"id": WORKFLOW}},
        {"workflowId": WORKFLOW},
        {"workflow": {"id": WORKFLOW}, "chatkit_configuration": {"file_upload": {"enabled": True}}},
        {"unknown": [1, 2, 3]},
        {},
    ],
)
def test_body_shapes_real_frontends_send(
    client: FlaskClient, upstream: FakeChatKit, body: dict
) -> None:
    assert client.post(URL, json=body).status_code == 200
    assert upstream.last.json["workflow"]["id"] == WORKFLOW
    assert "chatkit_configuration" not in upstream.last.json  # the server decides, not the body


def test_allowed_workflow_can_be_chosen(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    client = make_app(CHATKIT_ALLOWED_WORKFLOWS="wf_support, wf_sales").test_client()
    assert client.post(URL, json={"workflow": {"id": "wf_sales"}}).status_code == 200
    assert upstream.last.json["workflow"]["id"] == "wf_sales"


@pytest.mark.parametrize(
    "body",
    [{"workflow_id": "wf_evil"}, {"workflow": {"id": "wf_evil"}}, {"workflowId": "wf_evil"}],
)
def test_unlisted_workflow_is_403_without_upstream_call(
    client: FlaskClient, upstream: FakeChatKit, body: dict
) -> None:
    response = client.post(URL, json=body)
    assert response.status_code == 403
    assert response.get_json()["error"] == "workflow_not_allowed"
    assert upstream.count == 0


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        ("{not json", "application/json", 400, "invalid_request"),
        ("[1, 2]", "application/json", 400, "invalid_request"),
        ('"text"', "application/json", 400, "invalid_request"),
        ('{"workflow_id": 5}', "application/json", 400, "invalid_request"),
        ('{"workflow": "wf_x"}', "application/json", 400, "invalid_request"),
        ('{"workflow": {"id": ["a"]}}', "application/json", 400, "invalid_request"),
        (
            '{"workflow_id": "wf_a", "workflowId": "wf_b"}',
            "application/json",
            400,
            "invalid_request",
        ),
        ("workflow_id=wf", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        ("{}", "text/plain", 415, "unsupported_media_type"),
        ("\xff\xfe", "application/json", 400, "invalid_request"),
    ],
)
def test_invalid_requests_get_json_errors_and_no_upstream_call(
    client: FlaskClient,
    upstream: FakeChatKit,
    data: str,
    content_type: str,
    status: int,
    code: str,
) -> None:
    response = client.post(URL, data=data, content_type=content_type)
    assert response.status_code == status
    body = response.get_json()
    assert body["error"] == code
    assert body["message"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert upstream.count == 0


def test_empty_body_must_still_be_json(client: FlaskClient) -> None:
    assert client.post(URL, data="", content_type="application/json").status_code == 200
    assert client.post(URL, data="", content_type="text/plain").status_code == 415


def test_body_over_16_kib_is_413(client: FlaskClient, upstream: FakeChatKit) -> None:
    body = json.dumps({"pad": "x" * (16 * 1024)})
    response = client.post(URL, data=body, content_type="application/json")
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"
    assert upstream.count == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
def test_other_methods_are_405_json(
    client: FlaskClient, upstream: FakeChatKit, method: str
) -> None:
    response = client.open(URL, method=method)
    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]
    assert upstream.count == 0


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        (Behaviour.error(401), 502, "upstream_error"),
        (Behaviour.error(403), 502, "upstream_error"),
        (Behaviour.error(404, "Workflow with id 'wf_test_main' not found."), 502, "upstream_error"),
        (Behaviour.error(400), 502, "upstream_error"),
        (Behaviour.error(500), 502, "upstream_error"),
        (Behaviour.non_json(), 502, "upstream_error"),
        (Behaviour.missing_secret(), 502, "upstream_error"),
    ],
)
def test_upstream_failures_map_to_gateway_errors(
    client: FlaskClient, upstream: FakeChatKit, behaviour: Behaviour, status: int, code: str
) -> None:
    upstream.set_default(behaviour)
    response = client.post(URL, json={})
    assert response.status_code == status
    body = response.get_json()
    assert body["error"] == code
    assert set(body) == {"error", "message", "request_id"}
    assert "not found" not in response.get_data(as_text=True)  # upstream text never forwarded
    assert "ek_fake" not in response.get_data(as_text=True)


def test_upstream_429_is_503_busy_with_retry_after(
    client: FlaskClient, upstream: FakeChatKit
) -> None:
    upstream.enqueue(Behaviour.rate_limited(retry_after=7))
    response = client.post(URL, json={})
    assert response.status_code == 503
    assert response.get_json()["error"] == "upstream_busy"
    assert response.get_json()["retry_after"] == 7
    assert response.headers["Retry-After"] == "7"
    assert upstream.count == 1  # a 429 is not retried


@pytest.mark.parametrize("status", [502, 503, 504])
def test_retryable_statuses_are_retried_then_succeed(
    client: FlaskClient, upstream: FakeChatKit, status: int
) -> None:
    upstream.enqueue(Behaviour.error(status), Behaviour.error(status))
    response = client.post(URL, json={})
    assert response.status_code == 200
    assert upstream.count == 3  # two retries (the default) then success


def test_retries_are_bounded(make_app: Callable[..., Flask], upstream: FakeChatKit) -> None:
    upstream.set_default(Behaviour.error(503))
    response = make_app(CHATKIT_UPSTREAM_RETRIES=1).test_client().post(URL, json={})
    assert response.status_code == 502
    assert upstream.count == 2


def test_connection_reset_is_retried(client: FlaskClient, upstream: FakeChatKit) -> None:
    upstream.enqueue(Behaviour.reset())
    response = client.post(URL, json={})
    assert response.status_code == 200
    assert upstream.count == 2


def test_connection_refused_is_502(make_app: Callable[..., Flask], upstream: FakeChatKit) -> None:
    response = (
        make_app(CHATKIT_API_BASE="http://127.0.0.1:9", CHATKIT_UPSTREAM_RETRIES=0)
        .test_client()
        .post(URL, json={})
    )
    assert response.status_code == 502
    assert response.get_json()["error"] == "upstream_error"


def test_deadline_gives_504_within_the_timeout(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    upstream.set_default(Behaviour.slow(3.0))
    client = make_app(CHATKIT_UPSTREAM_TIMEOUT=0.5).test_client()
    started = time.monotonic()
    response = client.post(URL, json={})
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.get_json()["error"] == "upstream_timeout"
    assert elapsed < 1.5


def test_request_id_is_kept_when_valid_and_replaced_when_not(client: FlaskClient) -> None:
    response = client.post(
        URL, data="[", content_type="application/json", headers={"X-Request-ID": "abc-123"}
    )
    assert response.get_json()["request_id"] == "abc-123"
    assert response.headers["X-Request-ID"] == "abc-123"
    response = client.post(URL, json={}, headers={"X-Request-ID": "bad id with spaces"})
    assert response.headers["X-Request-ID"] != "bad id with spaces"
    assert len(response.headers["X-Request-ID"]) == 32


def test_signed_in_user_from_the_host_hook(upstream: FakeChatKit) -> None:
    app = Flask("host")
    app.config.update(base_config(upstream))
    chatkit = ChatKit()
    current = {"user": "customer-42"}

    @chatkit.user_loader
    def load_user() -> str | None:
        return current["user"]

    chatkit.init_app(app)
    client = app.test_client()
    response = client.post(URL, json={})
    assert response.status_code == 200
    assert upstream.last.json["user"] == "user_customer-42"
    assert "Set-Cookie" not in response.headers  # no visitor cookie for a signed-in user
    current["user"] = None
    client.post(URL, json={})
    assert upstream.last.json["user"].startswith("visitor_")


def test_host_app_registration_with_factory_and_custom_prefix(upstream: FakeChatKit) -> None:
    chatkit = ChatKit()

    def create() -> Flask:
        app = Flask("shop")
        app.config.update(base_config(upstream, CHATKIT_URL_PREFIX="/chat"))
        chatkit.init_app(app)
        return app

    first, second = create(), create()
    assert first.test_client().post("/chat/secret", json={}).status_code == 200
    assert second.test_client().post("/chat/secret", json={}).status_code == 200
    assert first.test_client().post(URL, json={}).status_code == 404


def test_host_app_with_missing_secret_key_fails_naming_it(upstream: FakeChatKit) -> None:
    app = Flask("host")
    config = base_config(upstream)
    del config["SECRET_KEY"]
    app.config.update(config)
    app.config["SECRET_KEY"] = None
    with pytest.raises(Exception, match="SECRET_KEY"):
        ChatKit(app)


def test_secrets_key_and_cookie_never_reach_logs(
    mint_logs: pytest.LogCaptureFixture, make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    client = make_app(CHATKIT_RATELIMIT_PER_USER="2 per minute").test_client()
    secrets = []
    for _ in range(3):
        response = client.post(URL, json={})
        if response.status_code == 200:
            secrets.append(response.get_json()["client_secret"])
    cookie = visitor_cookie(client)
    visitor_id = upstream.last.json["user"].removeprefix("visitor_")
    for behaviour in (Behaviour.error(401), Behaviour.non_json(), Behaviour.rate_limited(3)):
        upstream.enqueue(behaviour)
        make_app().test_client().post(URL, json={})
    text = mint_logs.text + "".join(str(r.__dict__) for r in mint_logs.records)
    assert len(secrets) == 2
    assert "mint request_id=" in text  # the log was captured at all
    for secret in [*secrets, TEST_API_KEY, TEST_SECRET_KEY, cookie, visitor_id]:
        assert secret not in text


def test_mint_log_line_has_the_documented_fields(
    mint_logs: pytest.LogCaptureFixture, client: FlaskClient, upstream: FakeChatKit
) -> None:
    client.post(URL, json={}, headers={"X-Request-ID": "req-log-1"})
    line = next(r.getMessage() for r in mint_logs.records if "req-log-1" in r.getMessage())
    for field in (
        "outcome=minted",
        "status=200",
        "visitor=v:",
        "ip=127.0.0.1",
        "upstream_status=200",
        "upstream_ms=",
        "upstream_request_id=req_",
    ):
        assert field in line
    upstream.enqueue(Behaviour.error(404, "Workflow with id 'wf_x' not found."))
    client.post(URL, json={}, headers={"X-Request-ID": "req-log-2"})
    record = next(r for r in mint_logs.records if "req-log-2" in r.getMessage())
    assert "upstream_status=404" in record.getMessage()
    assert "not found" in record.getMessage()  # the upstream's error goes to the log
