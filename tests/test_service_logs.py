"""What the service's log holds for healthy conversations, under gunicorn as shipped
(config/gunicorn.conf.py, its access log format included), in both CHATKIT_LOG_FORMAT values:
per message exactly one access line and one conversation line, nothing else but gunicorn's own
start and stop lines; no warning, no traceback, no asyncio "Task exception was never retrieved"
(also when a visitor hangs up mid-reply); with json, every line is one JSON object.

Python's warnings are on (PYTHONWARNINGS=default, as under ``python -X dev``): an SDK warning
must not reach the log either as raw text."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from chatkit_flask.testing.fake_responses import FakeResponses
from tests.conftest import REDIS_URL, TEST_SECRET_KEY
from tests.server_support import sse_events, user_input
from tests.test_server_gunicorn import start_gunicorn

ROOT = Path(__file__).resolve().parent.parent
MODEL_KEY = "test-model-key-not-a-real-one"
URL = "/api/chatkit"
MESSAGES = 3  # completed ones; one more is cut short by the visitor
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoggedService:
    """``gunicorn -c config/gunicorn.conf.py wsgi:app`` in server mode; stdout and stderr (access
    and error logs, and anything printed) into one file."""

    def __init__(self, tmp: Path, fake: FakeResponses, log_format: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "service.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "GUNICORN_"))}
        env.update(
            CHATKIT_BACKEND="server",
            CHATKIT_LOG_FORMAT=log_format,
            CHATKIT_ENV_FILE=str(tmp / "empty.env"),  # not the checkout's own .env, if any
            OPENAI_API_KEY=MODEL_KEY,
            OPENAI_BASE_URL=fake.base_url,
            OPENAI_AGENTS_DISABLE_TRACING="1",
            SECRET_KEY=TEST_SECRET_KEY,
            CHATKIT_STORE_URL=f"sqlite:///{tmp}/threads.db",
            CHATKIT_COOKIE_SECURE="false",
            RATELIMIT_STORAGE_URI=REDIS_URL,
            GUNICORN_BIND=f"127.0.0.1:{self.port}",
            GUNICORN_WORKERS="2",
            GUNICORN_THREADS="8",
            PYTHONWARNINGS="default",
        )
        (tmp / "empty.env").write_text("")
        self.process = start_gunicorn([], env, self.log_path, self.base)

    def post(self, body: dict[str, Any], cookie: str | None = None) -> requests.Response:
        with requests.Session() as session:
            return session.post(
                self.base + URL,
                json=body,
                cookies={"chatkit_session_id": cookie} if cookie else None,
                timeout=60,
            )

    def hang_up(self, body: dict[str, Any], cookie: str) -> None:
        """Send a message and leave once a few words of the reply have arrived."""
        raw = json.dumps(body)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(
                (
                    f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: application/json\r\nCookie: chatkit_session_id={cookie}\r\n"
                    f"Content-Length: {len(raw)}\r\n\r\n{raw}"
                ).encode()
            )
            received = b""
            while received.count(b"thread.item.updated") < 3:
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk

    def lines(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=MODEL_KEY) as server:
        yield server


def converse(service: LoggedService, fake: FakeResponses) -> tuple[list[str], str]:
    """MESSAGES completed messages in one thread, then one the visitor hangs up on; the request
    ids of the completed ones, and the cookie."""
    created = service.post({"type": "threads.create", "params": {"input": user_input("hello")}})
    assert created.status_code == 200, created.text
    cookie = created.cookies["chatkit_session_id"]
    thread = sse_events(created.content)[0]["thread"]["id"]
    completed = [created.headers["X-Request-ID"]]
    for n in range(MESSAGES - 1):
        reply = service.post(
            {"type": "threads.add_user_message",
             "params": {"thread_id": thread, "input": user_input(f"message {n}")}},
            cookie,
        )  # fmt: skip
        assert reply.status_code == 200
        assert sse_events(reply.content)[-1]["type"] == "thread.item.done"
        completed.append(reply.headers["X-Request-ID"])
    fake.token_delay = 0.2
    try:
        words = " ".join(f"word{n}" for n in range(40))
        service.hang_up(
            {"type": "threads.add_user_message",
             "params": {"thread_id": thread, "input": user_input(words)}},
            cookie,
        )  # fmt: skip
        assert fake.wait_for_abort(1, timeout=5), "the model request outlived the visitor"
    finally:
        fake.token_delay = 0.0
    return completed, cookie


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


TEXT_ACCESS = re.compile(r'"POST /api/chatkit" 200 \d+ \d+ms request_id=([0-9a-f]{32})$')
TEXT_MESSAGE = re.compile(
    r"^\S+ \S+ INFO \[\d+\] chatkit_flask\.message: chatkit request_id=([0-9a-f]{32}) "
)
TEXT_HEALTH = re.compile(r'"GET /healthz" 200 ')
TEXT_GUNICORN = re.compile(r"^\[[^]]+\] \[\d+\] \[INFO\] ")
# Each process says once at start-up which backend runs and why (issue 17).
TEXT_BACKEND = re.compile(r" INFO \[\d+\] chatkit_flask: chatkit_flask: server backend \(")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_conversation_logs_one_access_and_one_conversation_line_per_message(
    log_format: str, fake: FakeResponses, real_redis: Any, tmp_path: Path
) -> None:
    fake.clear()
    service = LoggedService(tmp_path, fake, log_format)
    try:
        completed, _ = converse(service, fake)
        # The hung-up message's conversation line is written when its stream ends.
        wait_for(lambda: sum("outcome" in line and "cancelled" in line for line in service.lines()))
        time.sleep(0.5)  # anything logged late (a task collected after the hang-up) lands too
    finally:
        service.stop()
    lines = service.lines()
    text = "\n".join(lines)
    for word in ("Task exception", "Traceback", "Warning", "WARNING", '"level":"warning"'):
        assert word not in text, text

    access: dict[str, int] = {}
    messages: dict[str, list[str]] = {}
    for line in lines:
        if log_format == "json":
            entry = json.loads(line)  # every line is one JSON object
            logger = entry["logger"]
            if logger == "gunicorn.access" and entry["path"] == URL:
                access[entry["request_id"]] = access.get(entry["request_id"], 0) + 1
            elif logger == "chatkit_flask.message":
                assert entry["event"] == "message"
                if entry["outcome"] == "completed":  # the shipped ASGI worker: a thread's wait
                    assert 0 <= entry["queued_ms"] <= entry["duration_ms"], line
                messages.setdefault(entry["request_id"], []).append(entry["outcome"])
            elif logger == "chatkit_flask" and " server backend (" in entry["message"]:
                assert entry["level"] == "info", line  # the start-up line
            else:
                assert logger in ("gunicorn.error", "gunicorn.access"), line
                assert entry["level"] == "info", line
        elif match := TEXT_ACCESS.search(line):
            access[match.group(1)] = access.get(match.group(1), 0) + 1
        elif match := TEXT_MESSAGE.search(line):
            outcome = re.search(r" outcome=(\w+) ", line)
            assert outcome, line
            messages.setdefault(match.group(1), []).append(outcome.group(1))
        else:
            assert (
                TEXT_HEALTH.search(line) or TEXT_GUNICORN.search(line) or TEXT_BACKEND.search(line)
            ), line

    assert len(messages) == MESSAGES + 1, text  # the hung-up one too
    assert set(access) == set(messages), text
    assert all(count == 1 for count in access.values()), access
    for request_id in completed:
        assert messages[request_id] == ["completed"], text
    (hung_up,) = set(messages) - set(completed)
    assert messages[hung_up] == ["cancelled"]


def test_a_configuration_error_is_logged_as_json_too(tmp_path: Path) -> None:
    # Start-up's own lines (an unknown variable's warning, the error that stops gunicorn) are
    # written by gunicorn's master check before any app logging exists: JSON all the same.
    (tmp_path / "empty.env").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "GUNICORN_"))}
    env.pop("OPENAI_API_KEY", None)
    env.update(
        CHATKIT_BACKEND="server",
        CHATKIT_LOG_FORMAT="json",
        CHATKIT_ENV_FILE=str(tmp_path / "empty.env"),
        CHATKIT_RATELIMIT_PER_USR="1 per day",  # a typo: warned about, by name
        SECRET_KEY=TEST_SECRET_KEY,
        RATELIMIT_STORAGE_URI="memory://",
        GUNICORN_BIND=f"127.0.0.1:{free_port()}",
        GUNICORN_WORKERS="1",
    )
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    messages = [entry.get("message", "") for entry in entries]
    assert any("configuration error: OPENAI_API_KEY" in m for m in messages), lines
    assert any("CHATKIT_RATELIMIT_PER_USR" in m for m in messages), lines
