"""A graceful shutdown drains (issue 24 item 8): under gunicorn with the shipped config, SIGTERM
lets short replies finish, ends the long ones after GUNICORN_GRACEFUL_TIMEOUT - 3 s with an error
event asking the visitor to send again (their partial answers stored, logged as interrupted),
and refuses a new message at once instead of starting a reply it would cut."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from chatkit_flask.server.endpoint import RESTART_MESSAGE
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.server_support import sse_events, user_input
from tests.test_server_gunicorn import MODEL_KEY, Service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GRACE = 6  # GUNICORN_GRACEFUL_TIMEOUT; replies get GRACE - 3 s


@pytest.fixture
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=MODEL_KEY) as server:
        yield server


def start(tmp_path: Path, fake: FakeResponses) -> Service:
    return Service(
        tmp_path,
        fake,
        f"sqlite:///{tmp_path}/threads.db",
        GUNICORN_WORKERS="1",
        GUNICORN_GRACEFUL_TIMEOUT=str(GRACE),
    )


def create(text: str) -> dict[str, Any]:
    return {"type": "threads.create", "params": {"input": user_input(text)}}


def test_sigterm_drains_open_replies_and_keeps_what_the_visitors_read(
    fake: FakeResponses, tmp_path: Path, real_redis: Any
) -> None:
    service = start(tmp_path, fake)
    cookie = requests.get(service.base + "/api/chatkit/config", timeout=5).cookies[
        "chatkit_session_id"
    ]
    long_text = " ".join(f"w{i}" for i in range(200))
    fake.enqueue(Reply(text="short answer here", token_delay=0.3),
                 Reply(text=long_text, token_delay=0.1))  # fmt: skip
    results: dict[str, Any] = {}

    def converse(name: str, text: str) -> None:
        started = time.monotonic()
        response = service.post(create(text), cookie)
        results[name] = (sse_events(response.content), time.monotonic() - started)

    threads = [threading.Thread(target=converse, args=(n, n)) for n in ("short", "long")]
    for thread in threads:
        thread.start()
        fake.wait_for(1 if thread is threads[0] else 2)
    kept = requests.Session()
    kept.get(service.base + "/healthz", timeout=5)  # a kept-alive connection, as a proxy holds
    time.sleep(0.3)

    service.process.send_signal(signal.SIGTERM)
    term_at = time.monotonic()
    time.sleep(0.5)  # past the moment uvicorn alone would close idle connections
    refused = kept.post(service.base + "/api/chatkit", json=create("new"),
                        cookies={"chatkit_session_id": cookie}, timeout=10)  # fmt: skip
    for thread in threads:
        thread.join(30)
    service.process.wait(30)
    exited_after = time.monotonic() - term_at
    log = service.log_path.read_text()

    short_events, _ = results["short"]
    long_events, _ = results["long"]
    assert short_events[-1]["type"] == "thread.item.done"  # finished within the drain
    assert long_events[-1] == {"type": "error", "code": "custom", "message": RESTART_MESSAGE,
                               "allow_retry": True}  # fmt: skip
    seen = "".join(e["update"]["delta"] for e in long_events
                   if e["type"] == "thread.item.updated" and "delta" in e["update"])  # fmt: skip
    assert seen and seen != long_text
    assert [e["message"] for e in sse_events(refused.content)] == [RESTART_MESSAGE]
    assert exited_after < GRACE  # drained before gunicorn's own deadline, nothing cut silently
    assert "outcome=interrupted" in log
    assert "Traceback" not in log

    # What the visitor read of the long answer is in the thread after the restart.
    fake.clear()
    again = start(tmp_path, fake)
    try:
        thread_id = long_events[0]["thread"]["id"]
        items = again.post(
            {"type": "items.list", "params": {"thread_id": thread_id, "order": "asc"}}, cookie
        ).json()["data"]
    finally:
        again.stop()
    stored = [i["content"][0]["text"] for i in items if i["type"] == "assistant_message"]
    assert stored and long_text.startswith(stored[0].strip())  # the answer's beginning, kept
    assert len(stored[0]) >= len(seen) // 2
