"""Property-based hostile input against ``POST /api/chatkit/secret`` (Flask test client).

Whatever arrives - arbitrary bytes, odd JSON, deep nesting, oversized bodies, any content type
or method, huge or binary headers and cookies, made-up Origin / Sec-Fetch-Site /
X-Forwarded-For - the answer is never a 500: it is a documented status, errors are the JSON
error shape, and only a request that is answered 200 ever reached the upstream.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.serving import make_server

from chatkit_flask.service import create_app
from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.conftest import WORKFLOW, base_config

URL = "/api/chatkit/secret"
ALLOWED_STATUSES = {200, 400, 403, 405, 413, 415, 429}
ERROR_CODES = {
    "invalid_request",
    "origin_not_allowed",
    "workflow_not_allowed",
    "method_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
    "rate_limited",
}
VISITOR_USER = re.compile(r"visitor_[A-Za-z0-9_-]{22}")
ORIGIN = "https://shop.example.com"


def fast(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Header values as a WSGI server hands them over: latin-1 text without CR/LF.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=300,
)
huge_header = st.integers(1000, 12000).map(lambda n: "x" * n)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=25,
)
workflow_values = json_values | st.sampled_from([WORKFLOW, "wf_other", "", " ", WORKFLOW + " "])
body_objects = st.fixed_dictionaries(
    {},
    optional={
        "workflow_id": workflow_values,
        "workflowId": workflow_values,
        "workflow": json_values | st.fixed_dictionaries({}, optional={"id": workflow_values}),
        "user": st.text(max_size=50),
        "client_secret": st.text(max_size=20),
    },
)
bodies = st.one_of(
    st.binary(max_size=2048),
    json_values.map(lambda v: json.dumps(v).encode()),
    body_objects.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 9000).map(lambda n: ("[" * n + "]" * n).encode()),  # deep nesting
    st.integers(1, 6000).map(lambda n: ('{"a":' * n + "1" + "}" * n).encode()),
    st.integers(16 * 1024 - 16, 64 * 1024).map(lambda n: b" " * (n - 2) + b"{}"),  # huge
    st.sampled_from([b"", b" ", b"\n\t", b"{}", b"null", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}"]),
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "APPLICATION/JSON",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
            "application/json-patch+json",
            "",
        ]
    ),
    header_text,
)
methods = st.sampled_from(
    ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "FOO", "post"]
)
fetch_sites = st.one_of(
    st.none(), st.sampled_from(["same-origin", "same-site", "cross-site", "none"]), header_text
)
origins = st.one_of(
    st.none(),
    st.sampled_from([ORIGIN, "https://evil.example", "null", "http://localhost", ""]),
    header_text,
)
forwarded_for = st.one_of(
    st.none(),
    st.ip_addresses().map(str),
    st.lists(st.ip_addresses().map(str), min_size=1, max_size=5).map(", ".join),
    header_text,
)
cookie_headers = st.one_of(
    st.none(),
    header_text.map(lambda v: f"chatkit_session_id={v}"),
    huge_header.map(lambda v: f"chatkit_session_id={v}"),
    st.lists(
        st.tuples(st.sampled_from(["chatkit_session_id", "a", "b", ""]), header_text),
        max_size=60,
    ).map(lambda pairs: "; ".join(f"{k}={v}" for k, v in pairs)),
    header_text,
)


def _app(server: FakeChatKit, **overrides: Any) -> Flask:
    config = base_config(
        server,
        **{
            "CHATKIT_RATELIMIT_PER_USER": "100000 per minute",
            "CHATKIT_RATELIMIT_PER_IP": "100000 per minute",
            "CHATKIT_BREAKER_FAILURES": 0,
            "TESTING": False,  # production error handling: an unexpected exception is a 500
            **overrides,
        },
    )
    return create_app(config, environ={})


@pytest.fixture(scope="module")
def apps(_chatkit_api_server: FakeChatKit) -> Iterator[dict[str, Flask]]:
    _chatkit_api_server.set_default(None)
    _chatkit_api_server.latency = 0.0
    yield {
        "same-site": _app(_chatkit_api_server),
        "allowlist+proxy": _app(
            _chatkit_api_server, CHATKIT_ALLOWED_ORIGINS=ORIGIN, CHATKIT_TRUSTED_PROXIES=1
        ),
    }
    _chatkit_api_server.clear()


def check(server: FakeChatKit, calls_before: int, response: Any, method: str = "POST") -> None:
    """The invariants every answer keeps."""
    status = response.status_code
    assert status in ALLOWED_STATUSES, (status, response.get_data()[:200])
    calls = server.count - calls_before
    if status == 200 and method.upper() == "POST":
        assert calls == 1
        body = response.get_json()
        assert set(body) == {"client_secret", "expires_at", "expires_after"}
        user = server.last.json["user"]
        assert VISITOR_USER.fullmatch(user), user  # nothing the client sent became the user
    else:
        assert calls == 0, "invalid input reached the upstream"
    if status >= 400 and method.upper() != "HEAD":
        assert response.mimetype == "application/json"
        body = response.get_json()
        assert {"error", "message", "request_id"} <= set(body)
        assert body["error"] in ERROR_CODES
        assert isinstance(body["request_id"], str) and body["request_id"]
        assert response.headers["X-Request-ID"] == body["request_id"]


@pytest.mark.parametrize("variant", ["same-site", "allowlist+proxy"])
@fast(1200)
@given(body=bodies, content_type=content_types)
def test_any_body_and_content_type(
    apps: dict[str, Flask],
    _chatkit_api_server: FakeChatKit,
    variant: str,
    body: bytes,
    content_type: str | None,
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    before = _chatkit_api_server.count
    response = apps[variant].test_client().post(URL, data=body, headers=headers)
    check(_chatkit_api_server, before, response)
    if response.status_code == 413:
        assert len(body) > 16 * 1024


@pytest.mark.parametrize("variant", ["same-site", "allowlist+proxy"])
@fast(800)
@given(
    origin=origins,
    fetch_site=fetch_sites,
    xff=forwarded_for,
    cookie=cookie_headers,
    request_id=st.one_of(st.none(), header_text),
    extra=st.one_of(st.none(), huge_header, header_text),
    remote=st.ip_addresses().map(str),
)
def test_any_headers_cookies_and_addresses(
    apps: dict[str, Flask],
    _chatkit_api_server: FakeChatKit,
    variant: str,
    origin: str | None,
    fetch_site: str | None,
    xff: str | None,
    cookie: str | None,
    request_id: str | None,
    extra: str | None,
    remote: str,
) -> None:
    headers: dict[str, str] = {}
    for name, value in (
        ("Origin", origin),
        ("Sec-Fetch-Site", fetch_site),
        ("X-Forwarded-For", xff),
        ("Cookie", cookie),
        ("X-Request-ID", request_id),
        ("X-Anything", extra),
    ):
        if value is not None:
            headers[name] = value
    before = _chatkit_api_server.count
    response = (
        apps[variant]
        .test_client(use_cookies=False)  # else werkzeug drops the Cookie header
        .post(URL, json={}, headers=headers, environ_base={"REMOTE_ADDR": remote})
    )
    check(_chatkit_api_server, before, response)
    listed = variant == "allowlist+proxy" and origin == ORIGIN
    if fetch_site == "cross-site" and not listed:
        assert response.status_code == 403
    if (
        not listed
        and origin not in (None, "http://localhost")  # the test client's own origin
        and fetch_site != "same-origin"
    ):
        assert response.status_code == 403  # the host check never matches a made-up origin here


@fast(400)
@given(method=methods, body=st.binary(max_size=64), origin=origins)
def test_any_method(
    apps: dict[str, Flask],
    _chatkit_api_server: FakeChatKit,
    method: str,
    body: bytes,
    origin: str | None,
) -> None:
    headers = {} if origin is None else {"Origin": origin}
    before = _chatkit_api_server.count
    response = apps["same-site"].test_client().open(URL, method=method, data=body, headers=headers)
    check(_chatkit_api_server, before, response, method)
    if method.upper() not in ("OPTIONS", "POST") and response.status_code != 403:
        assert response.status_code == 405
        if method.upper() != "HEAD":
            assert response.get_json()["error"] == "method_not_allowed"


@fast(500)
@given(
    tail=st.one_of(header_text, st.sampled_from(["", ".", "x", "=="])),
    cut=st.integers(0, 80),
    keep_prefix=st.booleans(),
)
def test_mangled_signed_cookies_never_become_someone(
    apps: dict[str, Flask], _chatkit_api_server: FakeChatKit, tail: str, cut: int, keep_prefix: bool
) -> None:
    """A real cookie, cut or extended: it verifies unchanged, or a new visitor is made."""
    app = apps["same-site"]
    visitor_id, cookie = app.extensions["chatkit"].cookie.issue()
    mangled = (cookie[:cut] if keep_prefix else cookie) + tail
    before = _chatkit_api_server.count
    response = app.test_client(use_cookies=False).post(
        URL, json={}, headers={"Cookie": f"chatkit_session_id={mangled}"}
    )
    check(_chatkit_api_server, before, response)
    user = _chatkit_api_server.last.json["user"]
    if user == f"visitor_{visitor_id}":
        # ";" ends the value; itsdangerous' base64 is lenient (padding, characters outside
        # its alphabet, trailing bits): only the whole signature, loosely written, verifies.
        sent = re.sub(r"[^A-Za-z0-9_.-]", "", mangled.split(";", 1)[0])
        assert sent.startswith(cookie[:-1])
    else:
        assert "Set-Cookie" in response.headers  # a fresh visitor, signed by us


def test_a_small_limit_still_answers_json_429(_chatkit_api_server: FakeChatKit) -> None:
    _chatkit_api_server.set_default(None)
    app = _app(_chatkit_api_server, CHATKIT_RATELIMIT_PER_IP="3 per minute")
    client = app.test_client()
    before = _chatkit_api_server.count
    responses = [client.post(URL, json={}) for _ in range(6)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429, 429]
    assert _chatkit_api_server.count - before == 3
    for response in responses[3:]:
        assert response.get_json()["error"] == "rate_limited"
        assert int(response.headers["Retry-After"]) >= 1


def test_unknown_method_and_path_under_the_prefix_are_json(apps: dict[str, Flask]) -> None:
    client = apps["same-site"].test_client()
    response = client.open(URL, method="TRACE")
    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"
    assert response.headers["X-Request-ID"] == response.get_json()["request_id"]
    response = client.get("/api/chatkit/nope")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


# --- a chunked body through a real server -----------------------------------------------------


def _answer_length(received: bytes) -> int:
    head, _, _ = received.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return len(head) + 4 + int(length.group(1) if length else 0)


def _chunked_post(port: int, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` with ``Transfer-Encoding: chunked`` (no Content-Length) over a socket."""
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096])
        for i in range(0, len(body), 4096)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + chunks + b"0\r\n\r\n"
        )
        received = b""
        # Read the answer by its Content-Length: werkzeug's server may keep draining the
        # refused body before it closes the connection.
        while b"\r\n\r\n" not in received or len(received) < _answer_length(received):
            data = sock.recv(65536)
            assert data, received
            received += data
    head, _, payload = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"workflow_id": "' + WORKFLOW.encode() + b'"}', 200),
        # Over the cap, yet its first 16 KiB are valid JSON: a truncating read would mint.
        (b"{}" + b" " * (16 * 1024 + 10), 413),
        (b'{"pad": "' + b"x" * (64 * 1024) + b'"}', 413),
    ],
)
def test_chunked_body_over_the_cap_is_413_through_a_real_server(
    _chatkit_api_server: FakeChatKit, body: bytes, status: int
) -> None:
    """werkzeug applies ``max_content_length`` to a chunked body by cutting it at the cap; the
    cut must never be parsed as the whole body."""
    _chatkit_api_server.set_default(None)
    server = make_server("127.0.0.1", 0, _app(_chatkit_api_server), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    before = _chatkit_api_server.count
    try:
        got, payload = _chunked_post(server.server_port, body)
    finally:
        server.shutdown()
        thread.join()
    assert got == status, payload[:200]
    assert _chatkit_api_server.count - before == (1 if status == 200 else 0)
    if status == 413:
        assert json.loads(payload)["error"] == "payload_too_large"
