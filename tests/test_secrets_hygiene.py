"""Nothing secret is leaked: the API key, client secrets and raw cookie values never appear in any
log (ours, Flask-Limiter's, werkzeug's, the root logger, stderr) or error body, and error bodies
never echo the upstream's text or the request's content."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
import requests
from flask import Flask

from chatkit_flask.testing.fake_chatkit import Behaviour, FakeChatKit
from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.test_faults import serve

URL = "/api/chatkit/secret"
COOKIE = "chatkit_session_id"
UPSTREAM_MARKER = "UPSTREAM-TEXT-7f3a"
REQUEST_MARKER = "REQUEST-TEXT-91c2"

UPSTREAM_FAULTS = [
    Behaviour.error(401, f"Incorrect API key provided: {TEST_API_KEY} {UPSTREAM_MARKER}"),
    Behaviour.error(403, f"{UPSTREAM_MARKER} project forbidden"),
    Behaviour.error(404, f"Workflow {UPSTREAM_MARKER} not found."),
    Behaviour.error(400, f"{UPSTREAM_MARKER} bad param"),
    Behaviour.error(500, f"{UPSTREAM_MARKER} boom"),
    Behaviour.error(503, f"{UPSTREAM_MARKER} overloaded"),
    Behaviour.rate_limited(3, f"{UPSTREAM_MARKER} slow down"),
    Behaviour.non_json(f"<html>{UPSTREAM_MARKER} {TEST_API_KEY}</html>".encode()),
    Behaviour.missing_secret(),
    Behaviour.reset(),
    Behaviour.slow(2),
]


def test_no_secret_in_any_log_or_error_body(
    mint_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    make_app: Callable[..., Flask],
    upstream: FakeChatKit,
) -> None:
    mint_logs.set_level(logging.DEBUG)  # the root logger too: werkzeug's request log lands there
    logging.getLogger("werkzeug").setLevel(logging.DEBUG)
    app = make_app(
        CHATKIT_RATELIMIT_PER_USER="4 per minute",
        CHATKIT_UPSTREAM_TIMEOUT=0.5,
        CHATKIT_UPSTREAM_RETRIES=1,
        CHATKIT_BREAKER_FAILURES=0,
        TESTING=False,
    )
    served = serve(app)
    secrets: list[str] = []
    cookies: list[str] = []
    bodies: list[str] = []
    try:
        base = served.base
        session = requests.Session()

        def mint(**kwargs: object) -> requests.Response:
            response = session.post(base + URL, json={}, timeout=10, **kwargs)  # type: ignore[arg-type]
            if response.status_code == 200:
                secrets.append(response.json()["client_secret"])
            else:
                bodies.append(response.text)
            cookies.extend(c.value for c in session.cookies if c.value)
            return response

        # Success, then the visitor goes over their own limit.
        for _ in range(5):
            mint()
        assert secrets and bodies[-1].find("rate_limited") >= 0
        session.cookies.clear()
        # Each upstream failure, for a fresh visitor each time.
        for behaviour in UPSTREAM_FAULTS:
            upstream.set_default(behaviour)  # a retry sees the same fault
            mint()
            session.cookies.clear()
        upstream.set_default(None)
        # Invalid input carrying a marker in every place a client controls.
        mint(
            data=f'{{"workflow_id": "{REQUEST_MARKER}"}}',
            headers={"Content-Type": "application/json"},
        )
        mint(data=f"{REQUEST_MARKER}", headers={"Content-Type": "application/json"})
        mint(data=f"{REQUEST_MARKER}", headers={"Content-Type": "text/plain"})
        mint(
            headers={"Origin": f"https://{REQUEST_MARKER}.example", "Sec-Fetch-Site": "cross-site"}
        )
        mint(data=b"x" * 20000, headers={"Content-Type": "application/json"})
        # A forged cookie and a huge one.
        session.cookies.set(COOKIE, f"{REQUEST_MARKER}.forged.sig")
        mint()
        session.cookies.clear()
        cookies.append(f"{REQUEST_MARKER}.forged.sig")
    finally:
        served.stop()

    # The limiter's storage down (fallback) and fail-closed.
    for fail_closed in (False, True):
        down = make_app(
            RATELIMIT_STORAGE_URI="redis://:pw-REDIS-SECRET@127.0.0.1:1/0",
            RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=not fail_closed,
        )
        response = down.test_client().post(URL, json={})
        if response.status_code == 200:
            secrets.append(response.get_json()["client_secret"])
        else:
            bodies.append(response.get_data(as_text=True))
    # The circuit open.
    breaker = make_app(CHATKIT_BREAKER_FAILURES=1, CHATKIT_UPSTREAM_RETRIES=0).test_client()
    upstream.set_default(Behaviour.error(500, UPSTREAM_MARKER))
    for _ in range(2):
        bodies.append(breaker.post(URL, json={}).get_data(as_text=True))
    upstream.set_default(None)
    time.sleep(0.1)

    captured = capfd.readouterr()
    logs = "\n".join(
        [
            mint_logs.text,
            *(str(record.__dict__) for record in mint_logs.records),
            captured.out,
            captured.err,
        ]
    )
    assert "mint request_id=" in logs and "werkzeug" in logs  # the logs really were captured
    assert len(secrets) >= 5 and len(cookies) >= 3 and len(bodies) >= 20
    visitor_ids = [c.split(".")[0] for c in cookies]
    for secret in [TEST_API_KEY, TEST_SECRET_KEY, "pw-REDIS-SECRET", *secrets, *cookies]:
        assert secret not in logs, secret[:12]
    for value in visitor_ids:
        assert value not in logs  # the raw visitor id (the cookie's payload) neither
    for body in bodies:
        for secret in [TEST_API_KEY, TEST_SECRET_KEY, *secrets, *cookies]:
            assert secret not in body
        assert UPSTREAM_MARKER not in body
        assert REQUEST_MARKER not in body
        assert "pw-REDIS-SECRET" not in body
    # The upstream's text does reach the server log (for operators), redacted of the key.
    assert UPSTREAM_MARKER in logs
    assert "[redacted]" in logs
