"""Logging inside a host site (``ChatKit(app)`` without the service's factory): the per-message
lines reach the site through the ``chatkit_flask`` logger like any other library's, carry their
fields as structured data (``record.chatkit``) for the site's formatter, come out once through a
site's ``logging.basicConfig``, and with time and level when the site configured nothing."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit")

from flask import Flask

from chatkit_flask import ChatKit
from chatkit_flask.testing.fake_responses import FakeResponses
from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.server_support import sse_events, user_input

ROOT = Path(__file__).resolve().parent.parent
URL = "/api/chatkit"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=TEST_API_KEY) as server:
        yield server


@pytest.fixture
def pristine_logger() -> Iterator[logging.Logger]:
    """The ``chatkit_flask`` logger as a fresh host process has it (the service's factory, run
    by other tests in this process, sets a level, a handler and propagate=False)."""
    logger = logging.getLogger("chatkit_flask")
    saved = logger.level, logger.handlers[:], logger.propagate
    logger.setLevel(logging.NOTSET)
    logger.handlers[:] = []
    logger.propagate = True
    yield logger
    logger.level, logger.handlers[:], logger.propagate = saved


def host_config(fake: FakeResponses, tmp: Path) -> dict[str, Any]:
    return {
        "CHATKIT_BACKEND": "server",
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": fake.base_url,
        "CHATKIT_TITLE_MODEL": "off",  # one model call per message
        "SECRET_KEY": TEST_SECRET_KEY,
        "CHATKIT_STORE_URL": f"sqlite:///{tmp}/threads.db",
        "CHATKIT_COOKIE_SECURE": False,
        "RATELIMIT_STORAGE_URI": "memory://",
    }


def test_a_host_gets_the_message_line_with_its_fields(
    fake: FakeResponses, tmp_path: Path, caplog: pytest.LogCaptureFixture, pristine_logger: Any
) -> None:
    app = Flask("host_site")
    app.config.update(host_config(fake, tmp_path))
    ChatKit(app)
    try:
        response = app.test_client().post(
            URL,
            json={"type": "threads.create", "params": {"input": user_input("secret words")}},
            buffered=True,
        )
        assert sse_events(response.data)[-1]["type"] == "thread.item.done"
    finally:
        app.extensions["chatkit"].server.bridge.close()
    (record,) = [r for r in caplog.records if r.name == "chatkit_flask.message"]
    assert record.levelno == logging.INFO
    fields = record.chatkit  # type: ignore[attr-defined]
    assert fields["request_id"] == response.headers["X-Request-ID"]
    assert fields["type"] == "threads.create"
    assert fields["outcome"] == "completed"
    assert fields["tokens_in"] > 0 and fields["tokens_out"] > 0
    assert fields["duration_ms"] >= fields["ttfe_ms"] > 0
    assert "secret words" not in record.getMessage() + json.dumps(fields, default=str)


# A site's process: its own logging set-up (argv[1]), then ChatKit(app) and one message.
HOST_SITE = """
import json, logging, sys
from flask import Flask
from chatkit_flask import ChatKit

class SiteJson(logging.Formatter):  # what a site's JSON formatter does with extra fields
    def format(self, record):
        entry = {"level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        entry.update(getattr(record, "chatkit", {}))
        return "SITE " + json.dumps(entry)

if sys.argv[1] == "basicConfig":
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().handlers[0].setFormatter(SiteJson())
app = Flask("host_site")
app.config.update(json.loads(sys.argv[2]))
ChatKit(app)
body = {"type": "threads.create", "params": {"input": {"content": [
    {"type": "input_text", "text": "hello"}], "attachments": [], "inference_options": {}}}}
response = app.test_client().post("/api/chatkit", json=body, buffered=True)
assert response.status_code == 200, response.data
print("REQUEST", response.headers["X-Request-ID"])
app.extensions["chatkit"].server.bridge.close()
"""


def run_host(setup: str, fake: FakeResponses, tmp: Path) -> tuple[str, list[str]]:
    config = json.dumps(host_config(fake, tmp))
    done = subprocess.run(
        [sys.executable, "-c", HOST_SITE, setup, config],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (request_id,) = [line.split()[1] for line in done.stdout.splitlines() if line[:8] == "REQUEST "]
    return request_id, [line for line in done.stderr.splitlines() if line.strip()]


def test_a_site_with_basic_config_gets_each_line_once_through_its_formatter(
    fake: FakeResponses, tmp_path: Path
) -> None:
    request_id, lines = run_host("basicConfig", fake, tmp_path)
    assert all(line.startswith("SITE {") for line in lines), lines
    entries = [json.loads(line[5:]) for line in lines]
    (message,) = [e for e in entries if e["logger"] == "chatkit_flask.message"]
    assert message["level"] == "INFO"
    assert message["request_id"] == request_id and message["outcome"] == "completed"


def test_a_site_without_logging_set_up_gets_time_and_level(
    fake: FakeResponses, tmp_path: Path
) -> None:
    request_id, lines = run_host("nothing", fake, tmp_path)
    (line,) = [line for line in lines if "chatkit_flask.message" in line]
    assert line.split()[2] == "INFO"  # "date time LEVEL [pid] logger: message"
    assert f"chatkit request_id={request_id} type=threads.create outcome=completed " in line
