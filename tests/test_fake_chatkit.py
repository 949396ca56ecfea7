"""Tests for the fake ChatKit API server (real sockets, python-requests as the client)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from chatkit_flask.testing.fake_chatkit import (
    Behaviour,
    FakeChatKit,
    RecordedRequest,
    error_envelope,
)

API_KEY = "sk-test-fake"
HEADERS = {
    "Authorization": f"Bearer {API_KEY}",
    "OpenAI-Beta": "chatkit_beta=v1",
    "Content-Type": "application/json",
}
BODY: dict[str, Any] = {"user": "user-1", "workflow": {"id": "wf_123"}}
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeChatKit]:
    with FakeChatKit(api_key=API_KEY) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeChatKit) -> Iterator[FakeChatKit]:
    server.clear()
    server.latency = 0.0
    yield server
    server.clear()
    server.latency = 0.0


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def create(
    fake: FakeChatKit,
    http: requests.Session | None = None,
    body: Any = BODY,
    headers: dict[str, str] | None = None,
    timeout: float = 2.0,
) -> requests.Response:
    client = http or requests
    return client.post(
        f"{fake.base_url}/v1/chatkit/sessions",
        data=body if isinstance(body, bytes) else json.dumps(body),
        headers=HEADERS if headers is None else headers,
        timeout=timeout,
    )


def assert_envelope(resp: requests.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["x-request-id"].startswith("req_")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


# --------------------------------------------------------------------------- default success
def test_success_shape_and_unique_secrets(fake: FakeChatKit, http: requests.Session) -> None:
    before = int(time.time())
    responses = [create(fake, http) for _ in range(5)]
    after = int(time.time())
    secrets_seen = set()
    for resp in responses:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["x-request-id"].startswith("req_")
        data = resp.json()
        assert data["object"] == "chatkit.session"
        assert data["id"].startswith("cksess_")
        assert data["client_secret"].startswith("ek_fake_")
        assert len(data["client_secret"]) == len("ek_fake_") + 32
        assert before + 600 <= data["expires_at"] <= after + 600
        assert data["status"] == "active"
        assert data["user"] == "user-1"
        assert data["workflow"] == {
            "id": "wf_123",
            "version": None,
            "state_variables": None,
            "tracing": {"enabled": True},
        }
        assert data["rate_limits"] == {"max_requests_per_1_minute": 10}
        assert data["max_requests_per_1_minute"] == 10
        assert data["chatkit_configuration"] == {
            "automatic_thread_titling": {"enabled": True},
            "file_upload": {"enabled": False, "max_file_size": 512, "max_files": 10},
            "history": {"enabled": True, "recent_threads": None},
        }
        secrets_seen.add(data["client_secret"])
    assert len(secrets_seen) == 5
    assert len({r.headers["x-request-id"] for r in responses}) == 5


def test_expires_after_and_overrides(fake: FakeChatKit) -> None:
    body = {
        "user": "u",
        "workflow": {"id": "wf_1", "version": "3", "tracing": {"enabled": False}},
        "expires_after": {"anchor": "created_at", "seconds": 60},
        "rate_limits": {"max_requests_per_1_minute": 3},
        "chatkit_configuration": {"file_upload": {"enabled": True}},
    }
    now = time.time()
    data = create(fake, body=body).json()
    assert abs(data["expires_at"] - (now + 60)) <= 2
    assert data["workflow"]["version"] == "3"
    assert data["workflow"]["tracing"] == {"enabled": False}
    assert data["max_requests_per_1_minute"] == 3
    assert data["chatkit_configuration"]["file_upload"]["enabled"] is True
    assert data["chatkit_configuration"]["file_upload"]["max_files"] == 10


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "auth",
    [None, "Bearer wrong", f"Basic {API_KEY}", API_KEY],
    ids=["none", "wrong", "basic", "raw"],
)
def test_bad_api_key_401(fake: FakeChatKit, auth: str | None) -> None:
    headers = {k: v for k, v in HEADERS.items() if k != "Authorization"}
    if auth is not None:
        headers["Authorization"] = auth
    resp = create(fake, headers=headers)
    assert resp.status_code == 401
    assert resp.json() == {
        "error": {
            "message": "Incorrect API key provided",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_no_api_key_configured_accepts_anything() -> None:
    with FakeChatKit() as open_fake:
        headers = {"OpenAI-Beta": "chatkit_beta=v1"}
        assert create(open_fake, headers=headers).status_code == 200


@pytest.mark.parametrize("beta", [None, "chatkit_beta=v2", "assistants=v2"])
def test_beta_header_required(fake: FakeChatKit, beta: str | None) -> None:
    headers = {k: v for k, v in HEADERS.items() if k != "OpenAI-Beta"}
    if beta is not None:
        headers["OpenAI-Beta"] = beta
    assert_envelope(create(fake, headers=headers), 400)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        {"workflow": {"id": "wf"}},
        {"user": "", "workflow": {"id": "wf"}},
        {"user": 5, "workflow": {"id": "wf"}},
        {"user": "u"},
        {"user": "u", "workflow": "wf"},
        {"user": "u", "workflow": {}},
        {"user": "u", "workflow": {"id": 7}},
        {"user": "u", "workflow": {"id": "wf"}, "expires_after": 60},
        {"user": "u", "workflow": {"id": "wf"}, "expires_after": {"seconds": 60}},
        {"user": "u", "workflow": {"id": "wf"}, "expires_after": {"anchor": "now", "seconds": 6}},
        {"user": "u", "workflow": {"id": "wf"}, "expires_after": {"anchor": "created_at"}},
        {
            "user": "u",
            "workflow": {"id": "wf"},
            "expires_after": {"anchor": "created_at", "seconds": 0},
        },
        {
            "user": "u",
            "workflow": {"id": "wf"},
            "expires_after": {"anchor": "created_at", "seconds": 601},
        },
        {
            "user": "u",
            "workflow": {"id": "wf"},
            "expires_after": {"anchor": "created_at", "seconds": "9"},
        },
        {
            "user": "u",
            "workflow": {"id": "wf"},
            "expires_after": {"anchor": "created_at", "seconds": 9.5},
        },
        {
            "user": "u",
            "workflow": {"id": "wf"},
            "expires_after": {"anchor": "created_at", "seconds": True},
        },
    ],
)
def test_body_validation_400(fake: FakeChatKit, body: Any) -> None:
    assert_envelope(create(fake, body=body), 400)
    assert fake.sessions == {}


def test_expires_after_bounds_accepted(fake: FakeChatKit) -> None:
    for seconds in (1, 600):
        body = {**BODY, "expires_after": {"anchor": "created_at", "seconds": seconds}}
        assert create(fake, body=body).status_code == 200


def test_validation_error_names_param(fake: FakeChatKit) -> None:
    body = {**BODY, "expires_after": {"anchor": "created_at", "seconds": 601}}
    err = assert_envelope(create(fake, body=body), 400, "integer_above_max_value")
    assert err["param"] == "expires_after.seconds"
    err = assert_envelope(create(fake, body={"workflow": {"id": "wf"}}), 400)
    assert err["param"] == "user"


# --------------------------------------------------------------------------- HTTP layer
def test_keep_alive_reuses_one_connection(fake: FakeChatKit, http: requests.Session) -> None:
    for _ in range(50):
        assert create(fake, http).status_code == 200
    assert fake.count == 50
    assert fake.connections == 1


def test_connection_close_is_honoured(fake: FakeChatKit) -> None:
    payload = json.dumps(BODY).encode()
    head = (
        f"POST /v1/chatkit/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"OpenAI-Beta: chatkit_beta=v1\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", fake.port), timeout=2) as sock:
        sock.sendall(head + payload)
        data = b""
        while chunk := sock.recv(65536):  # EOF proves the server closed the connection
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK"
    assert b"Connection: close" in rest
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["object"] == "chatkit.session"


def test_chunked_body_rejected(fake: FakeChatKit) -> None:
    head = (
        b"POST /v1/chatkit/sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", fake.port), timeout=2) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")


def test_unknown_path_and_method(fake: FakeChatKit, http: requests.Session) -> None:
    assert_envelope(http.post(f"{fake.base_url}/v1/responses", headers=HEADERS, timeout=2), 404)
    assert_envelope(http.get(f"{fake.base_url}/", timeout=2), 404)
    assert_envelope(http.get(f"{fake.base_url}/v1/chatkit/sessions", timeout=2), 405)
    assert create(fake, http).status_code == 200  # connection still usable


# --------------------------------------------------------------------------- scripted faults
def test_rate_limited_with_retry_after(fake: FakeChatKit, http: requests.Session) -> None:
    fake.enqueue(Behaviour.rate_limited(retry_after=7))
    resp = create(fake, http)
    err = assert_envelope(resp, 429, "rate_limit_exceeded")
    assert err["type"] == "requests"
    assert resp.headers["Retry-After"] == "7"
    assert create(fake, http).status_code == 200  # back to the default
    assert fake.count == 2


def test_error_503_and_queue_order(fake: FakeChatKit, http: requests.Session) -> None:
    fake.enqueue(
        Behaviour.error(503),
        Behaviour.error(500, "boom", code="x"),
        Behaviour.respond(418, {"custom": True}, headers={"X-Extra": "1"}),
    )
    assert fake.pending == 3
    assert assert_envelope(create(fake, http), 503)["type"] == "server_error"
    assert assert_envelope(create(fake, http), 500, "x")["message"] == "boom"
    teapot = create(fake, http)
    assert (teapot.status_code, teapot.json(), teapot.headers["X-Extra"]) == (
        418,
        {"custom": True},
        "1",
    )
    assert fake.pending == 0
    assert create(fake, http).status_code == 200


def test_set_default(fake: FakeChatKit, http: requests.Session) -> None:
    fake.set_default(Behaviour.error(502))
    fake.enqueue(Behaviour.ok())
    assert create(fake, http).status_code == 200  # queue wins over the default
    assert [create(fake, http).status_code for _ in range(3)] == [502, 502, 502]
    fake.set_default(None)
    assert create(fake, http).status_code == 200


def test_reset_raises_connection_error(fake: FakeChatKit, http: requests.Session) -> None:
    fake.enqueue(Behaviour.reset())
    with pytest.raises(requests.ConnectionError):
        create(fake, http)
    assert fake.count == 1  # still recorded
    assert create(fake, http).status_code == 200  # the pool reconnects


def test_slow_times_out_without_blocking_others(fake: FakeChatKit) -> None:
    fake.enqueue(Behaviour.slow(1.5))
    outcome: list[BaseException] = []

    def slow_call() -> None:
        try:
            create(fake, timeout=0.5)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=slow_call)
    thread.start()
    fake.wait_for(1, timeout=2)
    started = time.monotonic()
    assert create(fake, timeout=2).status_code == 200  # another connection answers at once
    assert time.monotonic() - started < 0.3
    thread.join(3)
    assert len(outcome) == 1 and isinstance(outcome[0], requests.ReadTimeout)


def test_non_json_body(fake: FakeChatKit) -> None:
    fake.enqueue(Behaviour.non_json())
    resp = create(fake)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    with pytest.raises(requests.JSONDecodeError):
        resp.json()
    fake.enqueue(
        Behaviour.non_json(b"upstream connect error", status=502, content_type="text/plain")
    )
    resp = create(fake)
    assert (resp.status_code, resp.text) == (502, "upstream connect error")


def test_missing_secret(fake: FakeChatKit) -> None:
    fake.enqueue(Behaviour.missing_secret())
    resp = create(fake)
    assert resp.status_code == 200
    data = resp.json()
    assert "client_secret" not in data
    assert data["object"] == "chatkit.session"
    assert data["expires_at"] > time.time()


def test_hang_until_client_gives_up(fake: FakeChatKit) -> None:
    fake.enqueue(Behaviour.hang())
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        create(fake, timeout=0.3)
    assert time.monotonic() - started < 1.0
    assert fake.count == 1
    assert create(fake).status_code == 200


def test_latency_applies_to_session_create(fake: FakeChatKit) -> None:
    fake.latency = 0.2
    started = time.monotonic()
    assert create(fake).status_code == 200
    assert time.monotonic() - started >= 0.19


def test_stop_with_hanging_and_slow_connections_is_fast() -> None:
    fake = FakeChatKit().start()
    port = fake.port
    fake.enqueue(Behaviour.hang(), Behaviour.slow(30))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            create(fake, headers={"OpenAI-Beta": "chatkit_beta=v1"}, timeout=10)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    fake.wait_for(2)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 1.0
    for t in threads:
        t.join(2)
    assert len(errors) == 2 and all(isinstance(e, requests.ConnectionError) for e in errors)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        pass
    fake.stop()  # idempotent


# --------------------------------------------------------------------------- cancel + recording
def test_cancel_session(fake: FakeChatKit, http: requests.Session) -> None:
    session = create(fake, http).json()
    url = f"{fake.base_url}/v1/chatkit/sessions/{session['id']}/cancel"
    resp = http.post(url, headers=HEADERS, timeout=2)
    assert resp.status_code == 200
    cancelled = resp.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["id"] == session["id"]
    assert cancelled["client_secret"] == session["client_secret"]
    assert fake.sessions[session["id"]]["status"] == "cancelled"
    missing = http.post(
        f"{fake.base_url}/v1/chatkit/sessions/cksess_nope/cancel", headers=HEADERS, timeout=2
    )
    assert "cksess_nope" in assert_envelope(missing, 404)["message"]
    unauth = http.post(url, headers={"OpenAI-Beta": "chatkit_beta=v1"}, timeout=2)
    assert_envelope(unauth, 401, "invalid_api_key")


def test_recording(fake: FakeChatKit, http: requests.Session) -> None:
    create(fake, http)
    fake.enqueue(Behaviour.reset())
    with pytest.raises(requests.ConnectionError):
        create(fake, http, body={"user": "other", "workflow": {"id": "wf_2"}})
    http.get(f"{fake.base_url}/nowhere?x=1", timeout=2)
    recorded = fake.wait_for(3, timeout=1)
    assert fake.count == 3 and len(fake.requests) == 3
    first = recorded[0]
    assert isinstance(first, RecordedRequest)
    assert (first.method, first.path) == ("POST", "/v1/chatkit/sessions")
    assert first.headers["authorization"] == f"Bearer {API_KEY}"
    assert first.headers["openai-beta"] == "chatkit_beta=v1"
    assert first.json == BODY
    assert json.loads(first.raw_body) == BODY
    assert recorded[1].json["user"] == "other"
    assert (recorded[2].method, recorded[2].path, recorded[2].json) == ("GET", "/nowhere?x=1", None)
    assert fake.last == recorded[2]
    fake.clear()
    assert fake.count == 0 and fake.requests == [] and fake.last is None
    with pytest.raises(TimeoutError):
        fake.wait_for(1, timeout=0.05)


def test_max_history_bounds_memory() -> None:
    with FakeChatKit(max_history=3) as small, requests.Session() as http:
        headers = {"OpenAI-Beta": "chatkit_beta=v1"}
        for _ in range(5):
            create(small, http, headers=headers)
        assert small.count == 5
        assert len(small.requests) == 3
        assert len(small.sessions) == 3


def test_error_envelope_helper() -> None:
    assert error_envelope("m") == {
        "error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}
    }


def test_context_manager_and_base_url() -> None:
    fake = FakeChatKit()
    with pytest.raises(RuntimeError):
        _ = fake.port
    with fake as running:
        assert running is fake
        assert fake.base_url == f"http://127.0.0.1:{fake.port}"
        with pytest.raises(RuntimeError):
            fake.start()


def test_bind_failure_raises() -> None:
    with FakeChatKit() as first, pytest.raises(OSError):
        FakeChatKit(port=first.port).start()


# --------------------------------------------------------------------------- CLI
def test_cli_serves_until_sigterm() -> None:
    module = "chatkit_flask.testing.fake_chatkit"
    cmd = [sys.executable, "-m", module, "--port", "0", "--api-key", API_KEY]
    with subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("fake ChatKit API listening on http://127.0.0.1:")
            base_url = line.rsplit(" ", 1)[1]
            url = f"{base_url}/v1/chatkit/sessions"
            resp = requests.post(url, json=BODY, headers=HEADERS, timeout=2)
            assert resp.status_code == 200
            assert resp.json()["client_secret"].startswith("ek_fake_")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=5)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
