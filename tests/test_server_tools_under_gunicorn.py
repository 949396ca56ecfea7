"""Client tools and the stop button mid-tool under gunicorn as shipped (config/gunicorn.conf.py:
server mode's own worker, replies written by the event loop), on every thread store.

A client tool's call ends the stream, the output continues the run, a second output is a 409;
the visitor's socket closing while a tool waits cancels the tool, the thread keeps what was
finished and no half-made widget, and the next message is answered. (In-process, without
gunicorn: tests/test_server_client_tools.py, tests/test_server_stop_midway.py.)"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# chatkit_flask.server first: it silences the SDK's own deprecation warning at import.
pytest.importorskip("chatkit_flask.server.protocol")

from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.server_support import sse_events, user_input
from tests.test_server_gunicorn import MODEL_KEY, URL, Service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=MODEL_KEY) as server:
        yield server


def wait_for(path: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_stop_while_a_tool_waits_under_gunicorn(
    fake: FakeResponses, store_url: str, real_redis: Any, tmp_path: Path
) -> None:
    fake.clear()
    marks = tmp_path / "marks"
    marks.mkdir()
    service = Service(tmp_path, fake, store_url, CHATKIT_AGENT="tests.stop_midway_site:agent",
                      STOP_MIDWAY_DIR=str(marks), GUNICORN_WORKERS="1")  # fmt: skip
    try:
        cookie = service.post({"type": "threads.list", "params": {}}).cookies["chatkit_session_id"]
        fake.enqueue(Reply.call_tool("slow_search"))
        body = json.dumps({"type": "threads.create", "params": {"input": user_input("find")}})
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        sock.sendall(
            (
                f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Cookie: chatkit_session_id={cookie}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        received = b""
        while b"Still searching" not in received:  # the half-made widget is on screen
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        assert wait_for(marks / "waiting")
        sock.close()  # the stop button
        assert wait_for(marks / "cancelled"), "the tool kept waiting after the visitor left"

        (thread,) = service.post({"type": "threads.list", "params": {}}, cookie).json()["data"]
        listed = {"type": "items.list", "params": {"thread_id": thread["id"], "order": "asc"}}
        items = service.post(listed, cookie).json()["data"]
        assert [item["type"] for item in items] == ["user_message", "widget"]
        assert items[1]["widget"]["children"][0]["value"] == "Found one result"
        fake.enqueue("Here again.")
        again = {"type": "threads.add_user_message",
                 "params": {"thread_id": thread["id"], "input": user_input("still there?")}}
        events = sse_events(service.post(again, cookie).content)
        assert events[-1]["item"]["content"][0]["text"] == "Here again."
    finally:
        service.stop()
    assert not service.tracebacks(), service.log_path.read_text()[-3000:]


def test_a_client_tool_round_trip_under_gunicorn(
    fake: FakeResponses, store_url: str, real_redis: Any, tmp_path: Path
) -> None:
    """The service's demo agent (the shipped config turns the demo on) and its get_page_info."""
    fake.clear()
    service = Service(tmp_path, fake, store_url, GUNICORN_WORKERS="1")
    try:
        cookie = service.post({"type": "threads.list", "params": {}}).cookies["chatkit_session_id"]
        fake.enqueue(Reply.call_tool("get_page_info"), "It is noon for you.")
        create = {"type": "threads.create", "params": {"input": user_input("what time is it?")}}
        asked = sse_events(service.post(create, cookie).content)
        call = asked[-1]["item"]
        assert (call["type"], call["name"], call["status"]) == (
            "client_tool_call", "get_page_info", "pending"
        )  # fmt: skip
        output = {"type": "threads.add_client_tool_output",
                  "params": {"thread_id": asked[0]["thread"]["id"], "result": {"time": "12:00"}}}
        answered = sse_events(service.post(output, cookie).content)
        assert answered[-1]["item"]["content"][0]["text"] == "It is noon for you."
        again = service.post(output, cookie)
        assert (again.status_code, again.json()["error"]) == (409, "no_pending_tool_call")
        assert fake.count == 2
    finally:
        service.stop()
    assert not service.tracebacks(), service.log_path.read_text()[-3000:]
