"""Clients that stop reading (issue 22 item 1): under gunicorn, a reply whose client does not read
is dropped after ``CHATKIT_STREAM_WRITE_TIMEOUT``: the model call is aborted, the worker thread
and the visitor's stream slot are freed, and other visitors keep getting answers meanwhile."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.server_support import sse_events, user_input
from tests.test_server_gunicorn import MODEL_KEY, Service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WRITE_TIMEOUT = 2.0


@pytest.fixture
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=MODEL_KEY) as server:
        yield server


@pytest.fixture
def service(fake: FakeResponses, tmp_path: Path, real_redis: Any) -> Iterator[Service]:
    svc = Service(
        tmp_path,
        fake,
        f"sqlite:///{tmp_path}/threads.db",
        CHATKIT_MAX_STREAMS_PER_USER="1",
        CHATKIT_STREAM_WRITE_TIMEOUT=str(WRITE_TIMEOUT),
        CHATKIT_MAX_OUTPUT_TOKENS="100000",  # the long reply must not be cut by its length
        GUNICORN_WORKERS="1",
        GUNICORN_THREADS="2",
    )
    yield svc
    svc.stop()


def visitor_cookie(service: Service) -> str:
    return requests.get(service.base + "/api/chatkit/config", timeout=5).cookies[
        "chatkit_session_id"
    ]


def open_and_stop_reading(service: Service, cookie: str) -> socket.socket:
    """POST a message, read the first bytes of the answer, then never read again (a tiny
    receive window, so the server's writes block as soon as the kernel buffers are full)."""
    body = json.dumps({"type": "threads.create", "params": {"input": user_input("long")}})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", service.port))
    sock.sendall(
        (
            f"POST /api/chatkit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Cookie: chatkit_session_id={cookie}\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
    )
    assert b"200 OK" in sock.recv(1024)
    return sock


def chat(service: Service, cookie: str | None, text: str) -> str:
    response = service.post(
        {"type": "threads.create", "params": {"input": user_input(text)}}, cookie
    )
    events = sse_events(response.content)
    assert events and events[-1]["type"] == "thread.item.done", events
    return "".join(part["text"] for part in events[-1]["item"]["content"])


def chat_when_free(service: Service, cookie: str, text: str, within: float = 3.0) -> str:
    """Chat as soon as the visitor's stream slot is free again (the dropped stream's worker
    thread releases it a moment after the model call is aborted)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return chat(service, cookie, text)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_client_that_stops_reading_is_dropped_and_the_model_call_aborted(
    service: Service, fake: FakeResponses
) -> None:
    cookie = visitor_cookie(service)
    # About 12 MB of answer at once (more than the kernel buffers between server and client
    # hold), then the model keeps the call open: it is still "generating" when the reader stalls.
    words = [f"word{i}-" + "x" * 3000 for i in range(4_000)]
    fake.enqueue(Reply.hang(after_tokens=3_900, text=" ".join(words)))
    stalled = open_and_stop_reading(service, cookie)
    try:
        started = time.monotonic()
        # Meanwhile another visitor is answered (the worker's other thread).
        assert chat(service, None, "meanwhile") == "You said: meanwhile"

        aborts = fake.wait_for_abort(1, timeout=WRITE_TIMEOUT + 20)
        dropped_after = time.monotonic() - started
        # The slot of the stalled visitor is free again, and so is the thread: with two
        # threads, two more visitors in a row are answered.
        again = chat_when_free(service, cookie, "back")
        others = [chat(service, None, f"other {i}") for i in range(2)]
    finally:
        stalled.close()

    assert aborts and fake.completed == 4  # the long reply never ran to its end
    assert dropped_after < WRITE_TIMEOUT + 20
    assert again == "You said: back"
    assert others == ["You said: other 0", "You said: other 1"]
    log = service.log_path.read_text()
    assert "stream reader stalled" in log
    assert "Traceback" not in log
