"""Server mode end to end: Flask -> handle() -> bridge -> ChatKit SDK -> Agents SDK -> the real
AsyncOpenAI client -> the fake Responses API on a real socket (and, at the end, under gunicorn).

Threads live in a real store: every store (``store_url``) for the tests that write or read
threads; SQLite alone for the refusals decided before the store is asked (``sqlite_client``)
and under gunicorn (test_server_gunicorn runs gunicorn on every store)."""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit")

from agents import Agent, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message
from flask import request
from flask.testing import FlaskClient

from chatkit_flask.server.agent import ModelClient, build_plain_agent
from chatkit_flask.server.bridge import AsyncBridge
from chatkit_flask.server.context import RequestContext
from chatkit_flask.server.endpoint import HEARTBEAT_FRAME, handle
from chatkit_flask.server.protocol import (
    BUSY_MESSAGE,
    FAILED_MESSAGE,
    FlaskChatKitServer,
    TokenUsage,
    calls_model,
    request_type,
    streams,
)
from chatkit_flask.server.store import OwnerScopedStore, open_store
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.server_support import make_app, sse_events, user_input

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-model-key-not-a-real-one"
set_tracing_disabled(True)


# ------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def bridge() -> Iterator[AsyncBridge]:
    bridge = AsyncBridge(name="test-chatkit")
    yield bridge
    bridge.close()


@pytest.fixture
def usage() -> list[tuple[RequestContext, TokenUsage]]:
    return []


def close_store(store: OwnerScopedStore, bridge: AsyncBridge) -> None:
    """Close the store's connections that belong to ``bridge``'s loop (Redis, SQL)."""
    aclose = getattr(store, "aclose", None)
    if aclose is not None:
        bridge.run(aclose, 5)


@pytest.fixture
def store(store_url: str, bridge: AsyncBridge) -> Iterator[OwnerScopedStore]:
    """Every thread store, in turn."""
    made = open_store(store_url, thread_ttl=3600)
    yield made
    close_store(made, bridge)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> OwnerScopedStore:
    return open_store(f"sqlite:///{tmp_path}/threads.db", thread_ttl=3600)


def chat_server(
    store: OwnerScopedStore, fake: FakeResponses, usage: list[tuple[RequestContext, TokenUsage]]
) -> FlaskChatKitServer:
    fake.clear()
    fake.token_delay = 0.0
    return FlaskChatKitServer(
        store,
        build_plain_agent("gpt-test", "Answer briefly."),
        ModelClient(api_key=KEY, base_url=fake.base_url),
        max_input_chars=100,
        on_usage=lambda context, report: usage.append((context, report)),
    )


@pytest.fixture
def server(
    store: OwnerScopedStore, fake: FakeResponses, usage: list[tuple[RequestContext, TokenUsage]]
) -> FlaskChatKitServer:
    return chat_server(store, fake, usage)


@pytest.fixture
def client(server: FlaskChatKitServer, bridge: AsyncBridge) -> FlaskClient:
    return make_app(server, bridge).test_client()


@pytest.fixture
def sqlite_client(
    sqlite_store: OwnerScopedStore,
    fake: FakeResponses,
    usage: list[tuple[RequestContext, TokenUsage]],
    bridge: AsyncBridge,
) -> FlaskClient:
    """For refusals decided before the store is asked: one store is enough."""
    return make_app(chat_server(sqlite_store, fake, usage), bridge).test_client()


def post(client: FlaskClient, body: Any, owner: str = "visitor:alice") -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    # buffered: read the whole stream now (an unread stream is never answered, by design)
    return client.post("/chat", data=data, buffered=True,
                       headers={"X-Owner": owner, "Content-Type": "application/json"})


def create_thread(client: FlaskClient, text: str = "hello", owner: str = "visitor:alice") -> str:
    response = post(client, {"type": "threads.create", "params": {"input": user_input(text)}},
                    owner)
    assert response.status_code == 200
    return sse_events(response.data)[0]["thread"]["id"]


def items(client: FlaskClient, thread_id: str, owner: str = "visitor:alice") -> list[dict]:
    response = post(client, {"type": "items.list",
                             "params": {"thread_id": thread_id, "order": "asc"}}, owner)
    assert response.status_code == 200
    return response.get_json()["data"]


# ------------------------------------------------------------------ streaming
def test_threads_create_streams_sse_in_order(
    client: FlaskClient, usage: list[tuple[RequestContext, TokenUsage]]
) -> None:
    response = post(client, {"type": "threads.create", "params": {"input": user_input("hi")}})

    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.data.endswith(b"\n\n") and b"\nevent:" not in response.data
    events = sse_events(response.data)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["thread.created", "thread.item.done", "stream_options",
                         "thread.item.added"]
    assert set(kinds[4:-1]) == {"thread.item.updated"}
    assert kinds[-1] == "thread.item.done"
    assert events[1]["item"]["type"] == "user_message"
    answer = events[-1]["item"]
    assert answer["type"] == "assistant_message"
    assert answer["content"][0]["text"] == "You said: hi"
    (context, report), = usage
    assert context.owner == "visitor:alice"
    assert (report.outcome, report.input_tokens, report.output_tokens) == ("completed", 3, 3)


def test_add_user_message_sends_the_history(client: FlaskClient, fake: FakeResponses) -> None:
    thread_id = create_thread(client, "first question")
    response = post(client, {"type": "threads.add_user_message",
                             "params": {"thread_id": thread_id, "input": user_input("second")}})

    events = sse_events(response.data)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["thread.item.done", "stream_options", "thread.item.added"]
    assert set(kinds[3:-1]) == {"thread.item.updated"} and kinds[-1] == "thread.item.done"
    assert events[0]["item"]["content"][0]["text"] == "second"
    assert events[-1]["item"]["content"][0]["text"] == "You said: second"
    sent = fake.requests[-1].json
    assert sent["model"] == "gpt-test" and sent["stream"] is True
    assert sent["instructions"] == "Answer briefly."
    texts = [(item["role"], item["content"][0]["text"]) for item in sent["input"]]
    assert texts == [("user", "first question"), ("assistant", "You said: first question"),
                     ("user", "second")]
    assert fake.requests[-1].headers["authorization"] == f"Bearer {KEY}"


def test_history_is_the_newest_items(
    client: FlaskClient, server: FlaskChatKitServer, fake: FakeResponses
) -> None:
    server.history_items = 3
    thread_id = create_thread(client, "one")
    for text in ("two", "three"):
        response = post(client, {"type": "threads.add_user_message",
                                 "params": {"thread_id": thread_id, "input": user_input(text)}})
        assert response.status_code == 200, response.data
    texts = [item["content"][0]["text"] for item in fake.requests[-1].json["input"]]
    assert texts == ["two", "You said: two", "three"]


def test_retry_after_item_replaces_the_answer(client: FlaskClient, fake: FakeResponses) -> None:
    thread_id = create_thread(client, "question")
    user_item, first_answer = items(client, thread_id)
    fake.enqueue("A better answer.")

    response = post(client, {"type": "threads.retry_after_item",
                             "params": {"thread_id": thread_id, "item_id": user_item["id"]}})

    assert response.status_code == 200
    assert sse_events(response.data)[-1]["item"]["content"][0]["text"] == "A better answer."
    after = items(client, thread_id)
    assert len(after) == 2 and after[0]["id"] == user_item["id"]
    assert after[1]["id"] != first_answer["id"]


# ----------------------------------------------------------------- JSON types
def test_json_requests_list_get_update_feedback_delete(client: FlaskClient) -> None:
    thread_id = create_thread(client)

    listed = post(client, {"type": "threads.list", "params": {"limit": 10**9}})
    assert listed.status_code == 200 and listed.mimetype == "application/json"
    assert listed.headers["Cache-Control"] == "no-store"
    assert [t["id"] for t in listed.get_json()["data"]] == [thread_id]

    got = post(client, {"type": "threads.get_by_id", "params": {"thread_id": thread_id}})
    assert [i["type"] for i in got.get_json()["items"]["data"]] == ["user_message",
                                                                     "assistant_message"]
    answer_id = got.get_json()["items"]["data"][1]["id"]

    updated = post(client, {"type": "threads.update",
                            "params": {"thread_id": thread_id, "title": "Greetings"}})
    assert updated.get_json()["title"] == "Greetings"

    feedback = post(client, {"type": "items.feedback", "params": {
        "thread_id": thread_id, "item_ids": [answer_id], "kind": "positive"}})
    assert (feedback.status_code, feedback.get_json()) == (200, {})

    deleted = post(client, {"type": "threads.delete", "params": {"thread_id": thread_id}})
    assert deleted.status_code == 200
    gone = post(client, {"type": "threads.get_by_id", "params": {"thread_id": thread_id}})
    assert gone.status_code == 404 and gone.get_json()["error"] == "not_found"


@pytest.mark.parametrize(
    "body",
    [
        {"type": "threads.add_user_message", "params": {"input": user_input("x")}},
        {"type": "threads.get_by_id", "params": {}},
        {"type": "items.list", "params": {}},
        {"type": "threads.update", "params": {"title": "mine now"}},
        {"type": "threads.delete", "params": {}},
        {"type": "items.feedback", "params": {"item_ids": ["x"], "kind": "negative"}},
        {"type": "threads.retry_after_item", "params": {"item_id": "x"}},
    ],
    ids=lambda body: body["type"],
)
def test_another_owners_thread_is_404_before_any_stream_byte(
    client: FlaskClient, fake: FakeResponses, body: dict[str, Any]
) -> None:
    thread_id = create_thread(client, owner="visitor:alice")
    calls = fake.count
    body["params"]["thread_id"] = thread_id

    response = post(client, body, owner="visitor:mallory")

    assert response.status_code == 404
    assert response.mimetype == "application/json"
    assert response.get_json()["error"] == "not_found" and response.get_json()["request_id"]
    assert fake.count == calls
    assert len(items(client, thread_id)) == 2  # untouched


# --------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b"{}", b"null", b'{"type": 1}', b'{"type": "threads.nope"}',
     b'{"type": "threads.create"}', b'{"type": "threads.create", "params": {"input": "x"}}',
     b'{"type": "threads.list", "params": {"limit": "many"}}', b"\xff\xfe\x00",
     b'{"type": "threads.update", "params": {"thread_id": "thr_' + b"0" * 32
     + b'", "title": "' + b"x" * 300 + b'"}}',
     b"[" * 100_000],
)
def test_invalid_bodies_are_400(
    sqlite_client: FlaskClient, fake: FakeResponses, body: bytes
) -> None:
    response = post(sqlite_client, body)
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"
    assert fake.count == 0


def test_random_garbage_is_never_a_500(client: FlaskClient) -> None:
    rng = random.Random(1234)
    types = ["threads.create", "threads.add_user_message", "threads.list", "items.list",
             "threads.get_by_id", "threads.update", "items.feedback", "threads.retry_after_item"]
    values: list[Any] = [None, True, -1, 2**70, 1.5, "", "x" * 50, [], {}, [1, "a"], {"a": {}}]

    def junk(depth: int = 0) -> Any:
        if depth > 2 or rng.random() < 0.4:
            return rng.choice(values)
        keys = ["thread_id", "input", "content", "text", "limit", "after", "order", "item_id",
                "item_ids", "kind", "title", "attachments", "inference_options", "type"]
        return {rng.choice(keys): junk(depth + 1) for _ in range(rng.randint(0, 4))}

    for _ in range(150):
        body = {"type": rng.choice(types), "params": junk(), "metadata": junk()}
        response = post(client, body)
        assert response.status_code in (200, 400, 404), (body, response.data[:300])


@pytest.mark.parametrize(
    "body",
    [
        {"type": "attachments.create", "params": {"name": "a", "size": 1, "mime_type": "x/y"}},
        {"type": "attachments.delete", "params": {"attachment_id": "atc_1"}},
        {"type": "input.transcribe", "params": {"audio_base64": "", "mime_type": "audio/webm"}},
        {"type": "threads.create", "params": {"input": {**user_input("see file"),
                                                        "attachments": ["atc_1"]}}},
    ],
    ids=lambda body: body["type"],
)
def test_unsupported_requests_are_400(
    sqlite_client: FlaskClient, fake: FakeResponses, body: dict[str, Any]
) -> None:
    response = post(sqlite_client, body)
    assert response.status_code == 400
    assert response.get_json()["error"] == "unsupported_request"
    assert fake.count == 0


@pytest.mark.parametrize("kind", ["threads.custom_action", "threads.sync_custom_action"])
@pytest.mark.parametrize("action", [{}, {"type": "book_slot", "payload": {}}])
def test_actions_are_400_when_the_site_registered_no_handler(
    sqlite_client: FlaskClient, fake: FakeResponses, kind: str, action: dict[str, Any]
) -> None:
    response = post(sqlite_client, {"type": kind, "params": {"thread_id": "t", "action": action}})
    assert response.status_code == 400
    assert response.get_json()["error"] == "unsupported_action"
    assert fake.count == 0


def test_too_long_input_is_400_without_a_model_call(
    client: FlaskClient, fake: FakeResponses
) -> None:
    response = post(client, {"type": "threads.create",
                             "params": {"input": user_input("x" * 101)}})
    assert response.status_code == 400
    assert response.get_json()["error"] == "input_too_long"
    assert fake.count == 0
    assert post(client, {"type": "threads.list", "params": {}}).get_json()["data"] == []


# ---------------------------------------------------------------- failures
@pytest.mark.parametrize(
    ("reply", "message"),
    [(Reply.broken(after_tokens=2), FAILED_MESSAGE), (Reply.error(500), FAILED_MESSAGE),
     (Reply.rate_limited(), BUSY_MESSAGE)],
    ids=["broken-mid-stream", "500", "429"],
)
def test_a_model_failure_is_an_error_event(
    client: FlaskClient,
    fake: FakeResponses,
    usage: list[tuple[RequestContext, TokenUsage]],
    reply: Reply,
    message: str,
) -> None:
    fake.enqueue(reply)
    response = post(client, {"type": "threads.create", "params": {"input": user_input("a b c")}})

    assert response.status_code == 200
    events = sse_events(response.data)
    assert events[-1] == {"type": "error", "code": "custom", "message": message,
                          "allow_retry": True}
    assert b"server had an error" not in response.data and b"Rate limit" not in response.data
    assert usage[-1][1].outcome == "failed"
    # The thread and the question remain; the next message works.
    thread_id = events[0]["thread"]["id"]
    again = post(client, {"type": "threads.add_user_message",
                          "params": {"thread_id": thread_id, "input": user_input("again")}})
    assert sse_events(again.data)[-1]["item"]["content"][0]["text"] == "You said: again"


def test_leaving_mid_stream_leaves_no_task_error_for_asyncio_to_log(
    server: FlaskChatKitServer, store: OwnerScopedStore, fake: FakeResponses
) -> None:
    # Every hang-up used to end with asyncio logging "Task exception was never retrieved ...
    # StopAsyncIteration" (a wait on the run's events that the SDK abandons).
    bridge = AsyncBridge(name="test-hang-up")
    reported: list[dict[str, Any]] = []
    try:
        bridge.loop.set_exception_handler(lambda loop, context: reported.append(context))
        fake.token_delay = 0.1
        body = json.dumps(
            {"type": "threads.create", "params": {"input": user_input("one two three four five")}}
        ).encode()
        response = handle(server, bridge, body, RequestContext(owner="visitor:x", request_id="r"))
        received = b""
        for frame in response.response:
            received += frame
            if received.count(b"text_delta") >= 2:
                break
        response.close()  # what gunicorn does when the visitor leaves
        assert fake.wait_for_abort(1, timeout=5)
        bridge.run(lambda: asyncio.sleep(0.3), 5)  # the cancelled run winds down
        gc.collect()
        bridge.run(lambda: asyncio.sleep(0.1), 5)
    finally:
        fake.token_delay = 0.0
        close_store(store, bridge)
        bridge.close()
    assert not reported, [context.get("message") for context in reported]


def test_heartbeats_keep_a_silent_stream_alive_and_a_departure_is_noticed(
    server: FlaskChatKitServer,
    bridge: AsyncBridge,
    fake: FakeResponses,
    usage: list[tuple[RequestContext, TokenUsage]],
) -> None:
    """The model goes silent after one delta; heartbeats flow; closing the response (what the
    WSGI server does when the client leaves) aborts the model request."""
    fake.enqueue(Reply.hang(after_tokens=1))
    app = make_app(server, bridge)
    app.view_functions["chat"] = lambda: handle(
        server, bridge, request.get_data(), RequestContext(owner="visitor:alice"), heartbeat=0.05
    )
    response = app.test_client().post(
        "/chat", data=json.dumps({"type": "threads.create",
                                  "params": {"input": user_input("a b c d")}}))
    frames = iter(response.response)
    received = [next(frames) for _ in range(12)]
    assert HEARTBEAT_FRAME in received and received[0].startswith(b"data: ")
    closed = time.monotonic()
    response.close()
    (abort,) = fake.wait_for_abort(1, timeout=2)
    assert abort.at - closed < 1.0
    assert usage[-1][1].outcome == "cancelled"


# ------------------------------------------------------- agents, no HTTP
def test_scripted_agent_factory_gets_the_request_context(
    bridge: AsyncBridge, sqlite_store: OwnerScopedStore
) -> None:
    model = ScriptedModel([[assistant_message("Scripted hello", item_id="msg_scripted_1")]])
    seen: list[RequestContext] = []

    def factory(context: RequestContext) -> Agent:
        seen.append(context)
        return Agent(name="Scripted", model=model)

    server = FlaskChatKitServer(sqlite_store, factory)
    client = make_app(server, bridge).test_client()
    response = post(client, {"type": "threads.create", "params": {"input": user_input("yo")}},
                    owner="user:bob")

    assert sse_events(response.data)[-1]["item"]["content"][0]["text"] == "Scripted hello"
    assert [c.owner for c in seen] == ["user:bob"]
    assert model.last_call is not None and model.last_call.input[-1]["content"][0]["text"] == "yo"


def test_classifier() -> None:
    assert request_type(b'{"type": "threads.create", "params": {}}') == "threads.create"
    assert request_type(b"garbage") is None and request_type(b'{"type": 3}') is None
    assert streams("threads.add_user_message") and not streams("threads.list")
    assert calls_model("threads.retry_after_item") and not calls_model("items.feedback")


def test_importing_the_package_does_not_import_the_sdks() -> None:
    code = ("import sys, chatkit_flask; "
            "assert 'chatkit' not in sys.modules and 'agents' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------- gunicorn
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def _gunicorn_port(
    fake: FakeResponses, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    port = free_port()
    here = tmp_path_factory.mktemp("gunicorn")
    env = {**os.environ, "FAKE_RESPONSES_URL": fake.base_url, "FAKE_RESPONSES_KEY": KEY,
           "TEST_STORE_URL": f"sqlite:///{here}/threads.db",
           "OPENAI_AGENTS_DISABLE_TRACING": "1", "PYTHONPATH": str(ROOT)}
    log_path = here / "stderr.log"
    with log_path.open("wb") as log:  # a file, not a pipe nobody reads (it could fill and block)
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads", "4",
             "--timeout", "2", "-b", f"127.0.0.1:{port}", "tests.server_wsgi:app"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(log_path.read_text()) from None
            time.sleep(0.1)
    yield port
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


@pytest.fixture
def gunicorn(_gunicorn_port: int, fake: FakeResponses) -> int:
    """One gthread worker (4 threads) with a 2 s worker timeout, talking to the fake model.
    Shared by the tests below: each uses its own owner."""
    fake.clear()
    return _gunicorn_port


def http_post(
    port: int, body: dict[str, Any], owner: str = "visitor:alice", timeout: float = 10
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/chat", json.dumps(body),
                 {"Content-Type": "application/json", "X-Owner": owner})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


@pytest.mark.slow
def test_disconnect_mid_stream_aborts_the_model_and_keeps_the_partial_answer(
    gunicorn: int, fake: FakeResponses
) -> None:
    fake.token_delay = 0.2
    body = json.dumps({"type": "threads.create", "params": {
        "input": user_input("one two three four five six seven eight nine ten")}})
    sock = socket.create_connection(("127.0.0.1", gunicorn), timeout=10)
    sock.sendall(f"POST /chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 f"X-Owner: visitor:leaver\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    received = b""
    while received.count(b'"assistant_message.content_part.text_delta"') < 3:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    closed = time.monotonic()
    sock.close()

    (abort,) = fake.wait_for_abort(1, timeout=2)
    assert abort.at - closed < 2.0
    assert fake.completed == 0

    time.sleep(0.3)  # the worker saves the partial answer after noticing
    _, listed = http_post(gunicorn, {"type": "threads.list", "params": {}}, "visitor:leaver")
    (thread,) = json.loads(listed)["data"]
    _, page = http_post(gunicorn, {"type": "items.list",
                                   "params": {"thread_id": thread["id"], "order": "asc"}},
                        "visitor:leaver")
    stored = json.loads(page)["data"]
    assert [i["type"] for i in stored] == ["user_message", "assistant_message"]
    partial = stored[1]["content"][0]["text"]
    assert partial.startswith("You said: one") and not partial.endswith("ten")


@pytest.mark.slow
def test_a_stream_longer_than_the_worker_timeout_completes(
    gunicorn: int, fake: FakeResponses
) -> None:
    fake.token_delay = 0.2  # 20 deltas: about 4 s against --timeout 2
    words = " ".join(f"w{i}" for i in range(18))
    started = time.monotonic()
    status, data = http_post(gunicorn, {"type": "threads.create",
                                        "params": {"input": user_input(words)}})
    assert status == 200 and time.monotonic() - started > 3.5
    assert sse_events(data)[-1]["item"]["content"][0]["text"] == f"You said: {words}"
    assert fake.completed == 1 and fake.aborted == 0


@pytest.mark.slow
def test_one_visitor_leaving_does_not_disturb_concurrent_streams(
    gunicorn: int, fake: FakeResponses
) -> None:
    fake.token_delay = 0.05
    words = " ".join(f"w{i}" for i in range(10))
    results: list[tuple[int, bytes]] = []
    workers = [
        threading.Thread(target=lambda: results.append(http_post(
            gunicorn, {"type": "threads.create", "params": {"input": user_input(words)}})))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    body = json.dumps({"type": "threads.create", "params": {"input": user_input(words)}})
    sock = socket.create_connection(("127.0.0.1", gunicorn), timeout=10)
    sock.sendall(f"POST /chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    received = b""
    while b"text_delta" not in received:
        received += sock.recv(65536)
    sock.close()
    for worker in workers:
        worker.join(10)

    assert [status for status, _ in results] == [200, 200]
    for _, data in results:
        assert sse_events(data)[-1]["item"]["content"][0]["text"] == f"You said: {words}"
    assert fake.wait_for_abort(1, timeout=2) and fake.aborted == 1
