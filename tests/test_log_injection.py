"""Log and terminal injection: every field of every log line (the app's text and JSON formats,
gunicorn's access log) and every CLI line escapes control characters with one function,
``chatkit_flask.sanitize.escape_control``."""

from __future__ import annotations

import datetime
import json
import logging
import re
import runpy
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from flask import Flask

from chatkit_flask.logs import configure_logging
from chatkit_flask.sanitize import escape_control
from chatkit_flask.testing.fake_chatkit import Behaviour, FakeChatKit

ROOT = Path(__file__).resolve().parent.parent
URL = "/api/chatkit/secret"
# What a hostile upstream (or a proxy in between) puts in its error body and request id.
FORGED_BODY = 'boom"\n2026-11-26 INFO mint request_id=x outcome=minted\x1b[2J\x9b31m\u2028\t'
FORGED_ID = "req_1\toutcome=minted\x1b]0;owned\x07"
# Anything that can end a line, start a terminal sequence or reorder text.
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    configure_logging("INFO", "text")


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("tab\there", "tab\\there"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("\x9b2J", "\\x9b2J"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("line\u2028sep", "line\\u2028sep"),
        ("\u202eevil", "\\u202eevil"),
        ("café /path?q=1 \"x\" \\", "café /path?q=1 \"x\" \\"),
    ],
)
def test_escape_control(raw: str, shown: str) -> None:
    assert escape_control(raw) == shown
    assert escape_control(shown) == shown  # escaping twice changes nothing


def test_quoted_values_escape_quotes_and_backslashes() -> None:
    assert escape_control('a"b\\c\n', quoted=True) == 'a\\"b\\\\c\\n'


def failing_upstream(upstream: FakeChatKit) -> None:
    upstream.set_default(
        Behaviour(
            status=500,
            raw_body=FORGED_BODY.encode(),
            content_type="text/plain",
            headers={"x-request-id": FORGED_ID},
        )
    )


def test_text_mint_line_cannot_be_forged(
    make_app: Callable[..., Flask], upstream: FakeChatKit, capsys: pytest.CaptureFixture[str]
) -> None:
    failing_upstream(upstream)
    app = make_app(CHATKIT_LOG_FORMAT="text", CHATKIT_UPSTREAM_RETRIES=0)
    assert app.test_client().post(URL, json={}).status_code == 502
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert not any(UNSAFE.search(line) for line in lines), err
    (mint,) = [line for line in lines if ": mint " in line]  # one line, not two
    fields = re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|[^ "]+)', mint.split(": mint", 1)[1])
    assert [value for key, value in fields if key == "outcome"] == ["upstream_error"]
    assert 'upstream_request_id="req_1\\toutcome=minted\\x1b]0;owned\\x07"' in mint
    # The upstream body is kept for operators, readable and on the same line.
    assert 'boom\\"\\n2026-11-26 INFO mint' in mint


def test_json_lines_stay_json(
    make_app: Callable[..., Flask], upstream: FakeChatKit, capsys: pytest.CaptureFixture[str]
) -> None:
    failing_upstream(upstream)
    app = make_app(CHATKIT_LOG_FORMAT="json", CHATKIT_UPSTREAM_RETRIES=0)
    assert app.test_client().post(URL, json={}).status_code == 502
    lines = capsys.readouterr().err.splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    (mint,) = [entry for entry in entries if entry.get("event") == "mint"]
    assert mint["upstream_request_id"] == FORGED_ID
    assert not any(UNSAFE.search(line) for line in lines)


def test_any_text_log_record_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text")
    log = logging.getLogger("chatkit_flask.test")
    log.warning("storage %s failed", "redis://h/0\n2026 INFO forged\x1b[2J")
    try:
        raise ValueError("bad\nvalue\x1b[31m")
    except ValueError:
        log.exception("with a traceback")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert not any(UNSAFE.search(line) for line in lines)
    assert "forged\\x1b[2J" in lines[0]
    assert "Traceback" in lines[1] and "ValueError: bad\\nvalue\\x1b[31m" in lines[1]


def access_line(path: str, request_id: str = "req-1") -> str:
    conf = runpy.run_path(str(ROOT / "config" / "gunicorn.conf.py"))
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("access_log_format", conf["access_log_format"])
    logger = conf["logger_class"](cfg)
    resp = SimpleNamespace(status="200 OK", sent=12, headers=[("X-Request-ID", request_id)])
    environ = {
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/x",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "203.0.113.7",
    }
    atoms = logger.atoms(resp, SimpleNamespace(headers=[]), environ, datetime.timedelta(0))
    return conf["access_log_format"] % logger.atoms_wrapper_class(atoms)


def test_gunicorn_access_log_escapes_the_decoded_path() -> None:
    # What gunicorn puts in PATH_INFO for /api%0a1.2.3.4%20-%20[x]%20%22GET%20/%22%1b[2J
    line = access_line('/api\n1.2.3.4 - [x] "GET /"\x1b[2J', request_id="r\x1b[31m")
    assert "\n" not in line and not UNSAFE.search(line), line
    assert '"POST /api\\n1.2.3.4 - [x] \\"GET /\\"\\x1b[2J"' in line
    assert line.endswith("request_id=r\\x1b[31m")


def test_gunicorn_access_log_keeps_ordinary_paths() -> None:
    assert '"POST /api/chatkit/secret" 200 12 0ms request_id=req-1' in access_line(
        "/api/chatkit/secret"
    )


def test_check_live_does_not_print_upstream_escape_codes(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    message = "Bad\x1b[2J\x1b]0;owned\x07 request\nFAKE  ok    all good"
    upstream.set_default(Behaviour.error(400, message))
    result = make_app().test_cli_runner().invoke(args=["chatkit", "check", "--live"])
    assert result.exit_code != 0
    assert not UNSAFE.search(result.output), result.output
    assert "Bad\\x1b[2J\\x1b]0;owned\\x07 request\\nFAKE" in result.output
