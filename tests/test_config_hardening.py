"""Settings that would send the key elsewhere or weaken the cookie are refused at start-up, by
name: CHATKIT_API_BASE (https only, except loopback; no userinfo, query or fragment; a trailing
/v1 dropped) and a SECRET_KEY under 32 bytes outside debug and testing. The demo page sends a
strict Content-Security-Policy."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from chatkit_flask.settings import ConfigError, Settings
from chatkit_flask.testing.fake_chatkit import FakeChatKit

REQUIRED = {
    "OPENAI_API_KEY": "k",
    "SECRET_KEY": "test-secret-key-of-at-least-32-bytes",
    "CHATKIT_WORKFLOW_ID": "wf_1",
}


def api_base(value: str) -> str:
    return Settings.from_mapping({**REQUIRED, "CHATKIT_API_BASE": value}).api_base


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://api.openai.com", "https://api.openai.com"),
        ("https://api.openai.com/", "https://api.openai.com"),
        ("https://api.openai.com/v1", "https://api.openai.com"),
        ("https://api.openai.com/v1/", "https://api.openai.com"),
        ("https://gateway.example/openai/v1", "https://gateway.example/openai"),
        ("http://127.0.0.1:8787", "http://127.0.0.1:8787"),
        ("http://localhost:8787/v1", "http://localhost:8787"),
        ("http://[::1]:8787", "http://[::1]:8787"),
    ],
)
def test_api_base_accepted_and_normalised(value: str, expected: str) -> None:
    assert api_base(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "http://api.openai.com",  # the key in clear text
        "http://10.0.0.5:8080",
        "https://api.openai.com@evil.example",  # the key goes to evil.example
        "https://user:pw@api.openai.com",
        "https://api.openai.com/?x=1",
        "https://api.openai.com/#frag",
        "https://api.openai.com:99999",
        "ftp://api.openai.com",
    ],
)
def test_api_base_refused(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        api_base(value)
    assert info.value.key == "CHATKIT_API_BASE"
    assert "pw@" not in str(info.value)


def test_a_short_secret_key_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({**REQUIRED, "SECRET_KEY": "s" * 31})
    assert info.value.key == "SECRET_KEY"
    assert "32 bytes" in str(info.value)


@pytest.mark.parametrize("flag", ["DEBUG", "TESTING"])
def test_a_short_secret_key_is_allowed_in_debug_or_testing(flag: str) -> None:
    settings = Settings.from_mapping({**REQUIRED, "SECRET_KEY": "short", flag: True})
    assert settings.secret_key == "short"


def test_a_32_byte_secret_key_is_enough() -> None:
    assert Settings.from_mapping({**REQUIRED, "SECRET_KEY": "é" * 16}).secret_key == "é" * 16


def test_demo_page_sends_a_strict_csp(make_app: Callable[..., Flask]) -> None:
    response = make_app(CHATKIT_DEMO=True).test_client().get("/")
    assert response.status_code == 200
    policy = response.headers["Content-Security-Policy"]
    csp = dict(part.partition(" ")[::2] for part in policy.split("; "))
    assert csp["frame-ancestors"] == "'none'"
    assert csp["default-src"] == "'none'"
    assert "'unsafe-inline'" not in csp["script-src"] and "'unsafe-eval'" not in csp["script-src"]
    assert csp["object-src"] == "'none'" and csp["base-uri"] == "'none'"
    assert response.headers["X-Frame-Options"] == "DENY"


def test_check_live_works_with_a_base_ending_in_v1(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    # Before: POST .../v1/v1/chatkit/sessions got a 404 and `check --live` blamed the workflow.
    app = make_app(CHATKIT_API_BASE=upstream.base_url + "/v1/")
    result = app.test_cli_runner().invoke(args=["chatkit", "check", "--live"])
    assert result.exit_code == 0, result.output
    assert upstream.last is not None and upstream.last.path.startswith("/v1/chatkit/sessions/")
