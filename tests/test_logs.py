"""Log output of the service: CHATKIT_LOG_FORMAT=json gives one JSON object per line with the
request id and the mint fields; request ids from clients are kept only when well-formed."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from chatkit_flask.logs import JsonFormatter, configure_logging
from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY, WORKFLOW

URL = "/api/chatkit/secret"
HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    # The service's handler wrote to this test's captured stderr; point it back.
    configure_logging("INFO", "text")


def json_lines(err: str) -> list[dict[str, Any]]:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]  # every line must be one JSON object


def mint_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry.get("event") == "mint"]


def test_json_mint_line(make_app: Callable[..., Flask], capsys: pytest.CaptureFixture[str]) -> None:
    app = make_app(CHATKIT_LOG_FORMAT="json")
    response = app.test_client().post(URL, json={}, headers={"X-Request-ID": "req-abc.1:2_3"})
    assert response.status_code == 200
    secret = response.get_json()["client_secret"]
    err = capsys.readouterr().err
    (entry,) = mint_entries(json_lines(err))
    assert entry["request_id"] == "req-abc.1:2_3" == response.headers["X-Request-ID"]
    assert entry["level"] == "info"
    assert entry["logger"] == "chatkit_flask.mint"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["outcome"] == "minted"
    assert entry["status"] == 200
    assert re.fullmatch(r"v:[0-9a-f]{16}", entry["visitor"])
    assert entry["ip"] == "127.0.0.1"
    assert entry["workflow"] == WORKFLOW
    assert entry["upstream_status"] == 200
    assert entry["upstream_request_id"].startswith("req_")
    assert entry["attempts"] == 1
    assert isinstance(entry["upstream_ms"], int | float)
    assert isinstance(entry["duration_ms"], int | float)
    for forbidden in (secret, TEST_API_KEY, TEST_SECRET_KEY, response.headers["Set-Cookie"]):
        assert forbidden not in err


def test_json_rate_limited_line(
    make_app: Callable[..., Flask], capsys: pytest.CaptureFixture[str]
) -> None:
    client = make_app(CHATKIT_LOG_FORMAT="json", CHATKIT_RATELIMIT_PER_USER="1 per minute")
    client = client.test_client()
    client.post(URL, json={})
    limited = client.post(URL, json={})
    assert limited.status_code == 429
    entries = mint_entries(json_lines(capsys.readouterr().err))
    assert [entry["outcome"] for entry in entries] == ["minted", "rate_limited"]
    last = entries[-1]
    assert last["level"] == "warning"
    assert last["status"] == 429
    assert last["scope"] == "user"
    assert last["request_id"] == limited.headers["X-Request-ID"]
    assert "upstream_status" not in last


def test_json_other_lines_carry_the_request_id(
    make_app: Callable[..., Flask], capsys: pytest.CaptureFixture[str], upstream: FakeChatKit
) -> None:
    import fakeredis
    import redis

    server = fakeredis.FakeServer()
    pool = redis.ConnectionPool(connection_class=fakeredis.FakeRedisConnection, server=server)
    app = make_app(
        CHATKIT_LOG_FORMAT="json",
        RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=False,
        RATELIMIT_STORAGE_URI="redis://",
        RATELIMIT_STORAGE_OPTIONS={"connection_pool": pool},
    )
    server.connected = False
    response = app.test_client().post(URL, json={}, headers={"X-Request-ID": "trace-7"})
    assert response.status_code == 503
    entries = json_lines(capsys.readouterr().err)
    storage = [e for e in entries if "storage failed" in e.get("message", "")]
    assert storage
    assert storage[0]["request_id"] == "trace-7"
    assert storage[0]["level"] == "error"
    (mint,) = mint_entries(entries)
    assert mint["outcome"] == "limiter_unavailable"
    assert mint["request_id"] == "trace-7"


def test_json_formatter_outside_a_request() -> None:
    record = logging.LogRecord("chatkit_flask", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    try:
        raise RuntimeError("inner")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "boom x"
    assert entry["level"] == "error"
    assert "request_id" not in entry
    assert "RuntimeError: inner" in entry["exception"]
    assert "\n" not in JsonFormatter().format(record)  # one line, even with a traceback


def test_text_format_is_one_line_of_key_values(
    make_app: Callable[..., Flask], capsys: pytest.CaptureFixture[str]
) -> None:
    app = make_app(CHATKIT_LOG_FORMAT="text")
    app.test_client().post(URL, json={}, headers={"X-Request-ID": "text-1"})
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "chatkit_flask.mint" in line]
    assert " INFO " in line
    assert "mint request_id=text-1 outcome=minted status=200 " in line


@pytest.mark.parametrize(
    "incoming",
    [
        "has spaces in it",
        "a" * 129,
        "x" * 300,
        "semi;colon",
        "new\tline",
        "ünïcode",
        "",
    ],
)
def test_invalid_request_ids_are_replaced(
    make_app: Callable[..., Flask], capsys: pytest.CaptureFixture[str], incoming: str
) -> None:
    app = make_app(CHATKIT_LOG_FORMAT="json")
    # An error answer (wrong media type): the body carries the request id too.
    response = app.test_client().post(
        URL, data="x", content_type="text/plain", headers={"X-Request-ID": incoming}
    )
    assert response.status_code == 415
    replaced = response.headers["X-Request-ID"]
    assert HEX32.fullmatch(replaced)
    assert response.get_json()["request_id"] == replaced
    (entry,) = mint_entries(json_lines(capsys.readouterr().err))
    assert entry["request_id"] == replaced
    assert entry["outcome"] == "unsupported_media_type"


def test_longest_valid_request_id_is_kept(make_app: Callable[..., Flask]) -> None:
    incoming = "A" * 128
    response = make_app().test_client().post(URL, json={}, headers={"X-Request-ID": incoming})
    assert response.headers["X-Request-ID"] == incoming


def test_a_warning_about_the_settings_comes_out_in_the_configured_format(
    upstream: FakeChatKit, capsys: pytest.CaptureFixture[str]
) -> None:
    # Logged while the service reads the settings that choose the format, as in a fresh worker
    # (no handler on the package's logger yet): held, then written as JSON like everything else.
    from chatkit_flask.service import create_app
    from tests.conftest import base_config

    logger = logging.getLogger("chatkit_flask")
    logger.handlers[:] = []
    logger.propagate = True
    create_app(base_config(upstream, CHATKIT_LOG_FORMAT="json"), environ={"CHATKIT_TYPO": "1"})
    entries = json_lines(capsys.readouterr().err)
    (warning,) = [e for e in entries if "CHATKIT_TYPO" in e.get("message", "")]
    assert (warning["logger"], warning["level"]) == ("chatkit_flask.settings", "warning")
