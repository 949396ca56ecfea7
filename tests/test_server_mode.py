"""Server mode as a site gets it: ``create_app`` with ``CHATKIT_BACKEND=server`` (no workflow id),
driven through the Flask test client, answering from the fake Responses API on a real socket,
threads in a SQLite file or the real Redis.

What a visitor may rely on: every ChatKit request type we serve answers (streams with the
right headers and event order, reads as JSON); a thread is its owner's alone (another visitor
gets a 404 before any stream byte); limits refuse a message inside the stream without calling
the model; bad input is a 4xx, never a 5xx; a model failure is a generic ``error`` event; bad
configuration stops start-up naming the key; logs hold one line per request and no secrets.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit")

from flask import Flask, request
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatkit_flask import ChatKit
from chatkit_flask.logs import JsonFormatter
from chatkit_flask.server.protocol import (
    BUSY_MESSAGE,
    FAILED_MESSAGE,
    STREAMING_TYPES,
    UNSUPPORTED_TYPES,
)
from chatkit_flask.service import create_app
from chatkit_flask.settings import ConfigError
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.conftest import REDIS_URL, TEST_API_KEY, TEST_SECRET_KEY, WORKFLOW
from tests.server_support import sse_events, user_input

URL = "/api/chatkit"
CONFIG_URL = "/api/chatkit/config"
COOKIE = "chatkit_session_id"
UPSTREAM_SECRET = "upstream-detail-that-must-stay-private"


# ------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def _fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=TEST_API_KEY) as server:
        yield server


@pytest.fixture
def fake(_fake: FakeResponses) -> Iterator[FakeResponses]:
    """The fake Responses API, reset for each test (echoes the last user message by default)."""
    _fake.clear()
    _fake.token_delay = 0.0
    yield _fake
    _fake.clear()
    _fake.token_delay = 0.0


def server_config(fake: FakeResponses, store_url: str, **overrides: Any) -> dict[str, Any]:
    """What a site sets for server mode: no CHATKIT_WORKFLOW_ID, the model at the fake."""
    config: dict[str, Any] = {
        "CHATKIT_BACKEND": "server",
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": fake.base_url,
        "SECRET_KEY": TEST_SECRET_KEY,
        "CHATKIT_STORE_URL": store_url,
        "CHATKIT_AGENT_MODEL": "gpt-test",
        "CHATKIT_AGENT_INSTRUCTIONS": "Answer briefly.",
        "CHATKIT_COOKIE_SECURE": False,
        "CHATKIT_MODEL_TIMEOUT": 10,
        "CHATKIT_TITLE_MODEL": "off",  # one model call per message (test_server_titles: on)
        # The service's shipped config turns the demo on, whose agent has the demo's tools and
        # instructions: these tests are of the plain agent (test_demo_site: the demo's).
        "CHATKIT_DEMO": False,
        "RATELIMIT_STORAGE_URI": "memory://",
        "TESTING": True,
    }
    config.update(overrides)
    return config


def close_app(app: Flask) -> None:
    """Stop the app's event loop thread (and its Redis store client, bound to that loop)."""
    runtime = app.extensions["chatkit"].server
    aclose = getattr(runtime.store, "aclose", None)
    if aclose is not None:
        runtime.bridge.run(aclose, 5)
    runtime.bridge.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/threads.db"


@pytest.fixture
def make_app(fake: FakeResponses, sqlite_url: str) -> Iterator[Callable[..., Flask]]:
    """Build the service app in server mode; keyword arguments override config."""
    apps: list[Flask] = []

    def factory(store_url: str = sqlite_url, **overrides: Any) -> Flask:
        app = create_app(server_config(fake, store_url, **overrides), environ={})
        apps.append(app)
        return app

    yield factory
    for app in apps:
        close_app(app)


@pytest.fixture
def app(make_app: Callable[..., Flask], store_url: str) -> Flask:
    return make_app(store_url)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


# -------------------------------------------------------------------- helpers
def post(client: FlaskClient, body: Any, **kwargs: Any) -> Any:
    """POST a ChatKit body; a stream is read to its end (``buffered``)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(URL, data=data, content_type="application/json", buffered=True, **kwargs)


def create_body(text: str) -> dict[str, Any]:
    return {"type": "threads.create", "params": {"input": user_input(text)}}


def message_body(thread_id: str, text: str) -> dict[str, Any]:
    return {"type": "threads.add_user_message",
            "params": {"thread_id": thread_id, "input": user_input(text)}}


def create_thread(client: FlaskClient, text: str = "hello") -> str:
    response = post(client, create_body(text))
    assert response.status_code == 200, response.data
    events = sse_events(response.data)
    assert events[0]["type"] == "thread.created", events
    return events[0]["thread"]["id"]


def answer(events: list[dict[str, Any]]) -> str:
    """The text of the finished assistant message that ends a stream."""
    last = events[-1]
    assert last["type"] == "thread.item.done", last
    assert last["item"]["type"] == "assistant_message", last
    return "".join(part["text"] for part in last["item"]["content"])


def thread_ids(client: FlaskClient) -> list[str]:
    response = post(client, {"type": "threads.list", "params": {}})
    assert response.status_code == 200, response.data
    return [thread["id"] for thread in response.get_json()["data"]]


def item_list(client: FlaskClient, thread_id: str) -> list[dict[str, Any]]:
    response = post(client, {"type": "items.list",
                             "params": {"thread_id": thread_id, "order": "asc"}})
    assert response.status_code == 200, response.data
    return response.get_json()["data"]


def assert_stream_headers(response: Any) -> None:
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Accel-Buffering"] == "no"


def assert_refused_in_stream(response: Any, words: str) -> dict[str, Any]:
    """A refused message: a 200 stream of exactly one ``error`` event, with the wait time."""
    assert_stream_headers(response)
    (event,) = sse_events(response.data)
    assert event["type"] == "error" and event["allow_retry"] is True
    assert words in event["message"]
    wait = int(response.headers["Retry-After"])
    assert wait >= 1
    return event


def assert_json_error(response: Any, status: int, code: str | set[str]) -> dict[str, Any]:
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = response.get_json()
    codes = {code} if isinstance(code, str) else code
    assert body["error"] in codes, body
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


# ------------------------------------------------------------- request types
def test_threads_create_streams_the_answer(
    client: FlaskClient, fake: FakeResponses, store_url: str
) -> None:
    fake.enqueue("Hello there, dear visitor.")
    response = post(client, create_body("hi"))

    assert_stream_headers(response)
    assert COOKIE in response.headers.get("Set-Cookie", "")  # the first answer issues it
    events = sse_events(response.data)
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["thread.created", "thread.item.done"]
    assert events[1]["item"]["type"] == "user_message"
    assert events[1]["item"]["content"][0]["text"] == "hi"
    assert "thread.item.updated" in kinds
    assert answer(events) == "Hello there, dear visitor."
    assert fake.count == 1
    sent = fake.requests[0].json
    assert sent["model"] == "gpt-test" and sent["instructions"] == "Answer briefly."
    assert fake.requests[0].headers["authorization"] == f"Bearer {TEST_API_KEY}"


def test_the_second_message_sends_the_history(
    client: FlaskClient, fake: FakeResponses, store_url: str
) -> None:
    fake.enqueue("First answer.", "Second answer.")
    thread_id = create_thread(client, "first question")
    response = post(client, message_body(thread_id, "second question"))

    assert_stream_headers(response)
    assert "Set-Cookie" not in response.headers  # the visitor kept their cookie
    events = sse_events(response.data)
    assert events[0]["type"] == "thread.item.done"
    assert events[0]["item"]["content"][0]["text"] == "second question"
    assert answer(events) == "Second answer."
    sent = fake.requests[-1].json["input"]
    assert [(item["role"], item["content"][0]["text"]) for item in sent] == [
        ("user", "first question"), ("assistant", "First answer."), ("user", "second question")]
    assert [i["type"] for i in item_list(client, thread_id)] == [
        "user_message", "assistant_message", "user_message", "assistant_message"]


def test_reads_and_edits_answer_json(
    client: FlaskClient, fake: FakeResponses, store_url: str
) -> None:
    first = create_thread(client, "one")
    second = create_thread(client, "two")
    calls = fake.count

    listed = post(client, {"type": "threads.list", "params": {"order": "desc"}})
    assert listed.status_code == 200 and listed.mimetype == "application/json"
    assert listed.headers["Cache-Control"] == "no-store"
    assert [t["id"] for t in listed.get_json()["data"]] == [second, first]

    got = post(client, {"type": "threads.get_by_id", "params": {"thread_id": first}})
    assert got.status_code == 200 and got.mimetype == "application/json"
    thread = got.get_json()
    assert thread["id"] == first
    user_item, answer_item = thread["items"]["data"]
    assert user_item["content"][0]["text"] == "one"
    assert answer_item["content"][0]["text"] == "You said: one"
    assert [i["id"] for i in item_list(client, first)] == [user_item["id"], answer_item["id"]]

    updated = post(client, {"type": "threads.update",
                            "params": {"thread_id": first, "title": "Numbers"}})
    assert updated.status_code == 200 and updated.get_json()["title"] == "Numbers"
    again = post(client, {"type": "threads.get_by_id", "params": {"thread_id": first}})
    assert again.get_json()["title"] == "Numbers"

    feedback = post(client, {"type": "items.feedback", "params": {
        "thread_id": first, "item_ids": [answer_item["id"]], "kind": "positive"}})
    assert (feedback.status_code, feedback.get_json()) == (200, {})

    deleted = post(client, {"type": "threads.delete", "params": {"thread_id": first}})
    assert deleted.status_code == 200 and deleted.mimetype == "application/json"
    assert thread_ids(client) == [second]
    gone = post(client, {"type": "threads.get_by_id", "params": {"thread_id": first}})
    assert_json_error(gone, 404, "not_found")
    assert fake.count == calls  # reads and edits never call the model


def test_retry_after_item_streams_a_new_answer(
    client: FlaskClient, fake: FakeResponses, store_url: str
) -> None:
    thread_id = create_thread(client, "question")
    user_item, first_answer = item_list(client, thread_id)
    fake.enqueue("A better answer.")

    response = post(client, {"type": "threads.retry_after_item",
                             "params": {"thread_id": thread_id, "item_id": user_item["id"]}})

    assert_stream_headers(response)
    assert answer(sse_events(response.data)) == "A better answer."
    assert fake.count == 2
    stored = item_list(client, thread_id)
    assert len(stored) == 2 and stored[0]["id"] == user_item["id"]
    assert stored[1]["id"] != first_answer["id"]
    assert stored[1]["content"][0]["text"] == "A better answer."


def test_server_mode_starts_without_a_workflow_id(fake: FakeResponses, sqlite_url: str) -> None:
    config = server_config(fake, sqlite_url)
    assert "CHATKIT_WORKFLOW_ID" not in config
    app = create_app(config, environ={})
    try:
        assert app.extensions["chatkit"].settings.backend == "server"
        assert "chatkit.secret" not in app.view_functions  # no hosted mint endpoint
    finally:
        close_app(app)


# ------------------------------------------------------------------ identity
def test_the_config_endpoint_issues_the_visitor_cookie(
    client: FlaskClient, fake: FakeResponses
) -> None:
    response = client.get(CONFIG_URL)

    assert response.status_code == 200
    assert response.get_json() == {
        "backend": "server",
        "url": URL,
        "domainKey": "domain_pk_localhost_dev",
    }
    assert response.headers["Cache-Control"] == "no-store"
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None and cookie.http_only
    # The widget's first requests then agree on who the visitor is.
    thread_id = create_thread(client)
    listed = post(client, {"type": "threads.list", "params": {}})
    assert "Set-Cookie" not in listed.headers
    assert [t["id"] for t in listed.get_json()["data"]] == [thread_id]
    assert client.get_cookie(COOKIE).value == cookie.value


FOREIGN_REQUESTS: dict[str, Callable[[str], dict[str, Any]]] = {
    "threads.get_by_id": lambda t: {"type": "threads.get_by_id", "params": {"thread_id": t}},
    "items.list": lambda t: {"type": "items.list", "params": {"thread_id": t}},
    "threads.add_user_message": lambda t: message_body(t, "let me in"),
    "threads.delete": lambda t: {"type": "threads.delete", "params": {"thread_id": t}},
    "threads.update": lambda t: {"type": "threads.update",
                                 "params": {"thread_id": t, "title": "mine now"}},
    "threads.list after it": lambda t: {"type": "threads.list", "params": {"after": t}},
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_REQUESTS))
def test_another_visitor_gets_404_and_never_sees_the_thread(
    app: Flask, fake: FakeResponses, store_url: str, kind: str
) -> None:
    alice = app.test_client()
    thread_id = create_thread(alice, "alice's secret")
    mallory = app.test_client()
    calls = fake.count

    response = post(mallory, FOREIGN_REQUESTS[kind](thread_id))

    body = assert_json_error(response, 404, "not_found")  # JSON: no stream byte was sent
    assert "alice" not in response.get_data(as_text=True)
    assert set(body) == {"error", "message", "request_id"}
    assert COOKIE in response.headers["Set-Cookie"]  # mallory is a visitor of her own
    assert fake.count == calls
    assert thread_ids(mallory) == []
    assert thread_ids(alice) == [thread_id]
    assert [i["content"][0]["text"] for i in item_list(alice, thread_id)] == [
        "alice's secret", "You said: alice's secret"]


def test_another_site_cannot_post_for_the_visitor(client: FlaskClient, fake: FakeResponses) -> None:
    thread_id = create_thread(client)
    headers = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    for body in (message_body(thread_id, "sent by another site"),
                 {"type": "threads.list", "params": {}}):
        assert_json_error(post(client, body, headers=headers), 403, "origin_not_allowed")
    assert fake.count == 1 and len(item_list(client, thread_id)) == 2


def test_a_forged_cookie_is_a_new_visitor(app: Flask, fake: FakeResponses) -> None:
    alice = app.test_client()
    thread_id = create_thread(alice)
    cookie = alice.get_cookie(COOKIE).value
    forger = app.test_client()
    forger.set_cookie(COOKIE, cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"))
    response = post(forger, {"type": "threads.get_by_id", "params": {"thread_id": thread_id}})
    assert_json_error(response, 404, "not_found")
    twin = app.test_client()  # the same cookie value: the same visitor
    twin.set_cookie(COOKIE, cookie)
    assert thread_ids(twin) == [thread_id]


def host_app(fake: FakeResponses, store_url: str) -> Flask:
    """A site's own Flask app that signs users in (here: the ``X-User`` header)."""
    app = Flask("host_site")
    app.config.update(server_config(fake, store_url))
    chatkit = ChatKit(app)

    @chatkit.user_loader
    def current_user() -> str | None:
        return request.headers.get("X-User")

    @app.get("/")
    def home() -> str:
        return "the host's page"

    return app


def test_a_signed_in_user_owns_their_threads_across_cookie_changes(
    fake: FakeResponses, store_url: str
) -> None:
    app = host_app(fake, store_url)
    try:
        laptop = app.test_client()
        laptop.get(CONFIG_URL)  # an anonymous visitor's cookie, before signing in
        response = post(laptop, create_body("from the laptop"), headers={"X-User": "alice"})
        assert_stream_headers(response)
        thread_id = sse_events(response.data)[0]["thread"]["id"]
        assert answer(sse_events(response.data)) == "You said: from the laptop"

        phone = app.test_client()  # another device: another cookie, the same user
        phone.get(CONFIG_URL)
        assert phone.get_cookie(COOKIE).value != laptop.get_cookie(COOKIE).value
        listed = post(phone, {"type": "threads.list", "params": {}}, headers={"X-User": "alice"})
        assert [t["id"] for t in listed.get_json()["data"]] == [thread_id]
        follow_up = post(phone, message_body(thread_id, "from the phone"),
                         headers={"X-User": "alice"})
        assert answer(sse_events(follow_up.data)) == "You said: from the phone"

        laptop.delete_cookie(COOKIE)
        items = post(laptop, {"type": "items.list", "params": {"thread_id": thread_id}},
                     headers={"X-User": "alice"})
        assert items.status_code == 200 and len(items.get_json()["data"]) == 4

        # Signed out (the same cookie) or another user: not theirs.
        for headers in ({}, {"X-User": "bob"}):
            refused = post(phone, {"type": "threads.get_by_id",
                                   "params": {"thread_id": thread_id}}, headers=headers)
            assert_json_error(refused, 404, "not_found")
        assert thread_ids(phone) == []
        assert app.test_client().get("/").data == b"the host's page"
    finally:
        close_app(app)


# -------------------------------------------------------------------- limits
def test_the_per_visitor_message_limit_refuses_in_stream_while_reads_work(
    make_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    app = make_app(CHATKIT_RATELIMIT_PER_USER="2 per minute", CHATKIT_RATELIMIT_PER_IP="off")
    client = app.test_client()
    first = create_thread(client, "one")
    create_thread(client, "two")
    calls = fake.count

    refused = post(client, create_body("three"))
    event = assert_refused_in_stream(refused, "You have sent too many messages")
    assert f"Try again in {refused.headers['Retry-After']} seconds" in event["message"]
    follow_up = post(client, message_body(first, "four"))
    assert_refused_in_stream(follow_up, "too many messages")

    assert fake.count == calls  # no model call
    assert len(thread_ids(client)) == 2  # no thread was created; reads still work
    assert len(item_list(client, first)) == 2  # nor a message stored
    assert create_thread(app.test_client(), "another visitor")  # others are not limited


def test_a_message_refused_as_invalid_does_not_count_as_a_message(
    make_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    app = make_app(CHATKIT_RATELIMIT_PER_USER="2 per minute", CHATKIT_MAX_INPUT_CHARS=10,
                   CHATKIT_RATELIMIT_REQUESTS_PER_IP="6 per minute")
    client = app.test_client()
    for body in (create_body("x" * 11), {"type": "threads.create"}):  # too long, malformed
        assert post(client, body).status_code == 400
    create_thread(client, "one")
    create_thread(client, "two")
    assert_refused_in_stream(post(client, create_body("three")), "too many messages")
    assert fake.count == 2
    # The requests limit counts the refused bodies (a request refused by the message limit
    # stopped there): 2 + 2 so far, then a read and another bad body make 6.
    assert post(client, {"type": "threads.list", "params": {}}).status_code == 200
    assert post(client, {"type": "threads.create"}).status_code == 400
    refused = post(client, {"type": "threads.list", "params": {}})
    assert assert_json_error(refused, 429, "rate_limited")["scope"] == "requests"


def test_the_per_ip_message_limit(make_app: Callable[..., Flask], fake: FakeResponses) -> None:
    app = make_app(CHATKIT_RATELIMIT_PER_USER="off", CHATKIT_RATELIMIT_PER_IP="2 per minute")
    create_thread(app.test_client())
    create_thread(app.test_client())
    newcomer = app.test_client()
    calls = fake.count

    assert_refused_in_stream(post(newcomer, create_body("hi")), "from your network")
    assert fake.count == calls
    assert thread_ids(newcomer) == []
    elsewhere = post(app.test_client(), create_body("hi"),
                     environ_base={"REMOTE_ADDR": "203.0.113.7"})
    assert answer(sse_events(elsewhere.data)) == "You said: hi"


def test_the_global_message_limit(make_app: Callable[..., Flask], fake: FakeResponses) -> None:
    app = make_app(CHATKIT_RATELIMIT_PER_USER="off", CHATKIT_RATELIMIT_PER_IP="off",
                   CHATKIT_RATELIMIT_GLOBAL="2 per minute")
    for address in ("203.0.113.1", "203.0.113.2"):
        response = post(app.test_client(), create_body("hi"), environ_base={"REMOTE_ADDR": address})
        assert answer(sse_events(response.data)) == "You said: hi"
    refused = post(app.test_client(), create_body("hi"),
                   environ_base={"REMOTE_ADDR": "203.0.113.3"})
    assert_refused_in_stream(refused, "The chat is very busy")
    assert fake.count == 2


def test_the_requests_per_ip_limit_counts_reads(
    make_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    app = make_app(CHATKIT_RATELIMIT_REQUESTS_PER_IP="4 per minute")
    client = app.test_client()
    create_thread(client)
    for _ in range(3):
        assert post(client, {"type": "threads.list", "params": {}}).status_code == 200

    refused = post(client, {"type": "threads.list", "params": {}})
    body = assert_json_error(refused, 429, "rate_limited")
    assert body["scope"] == "requests" and body["retry_after"] >= 1
    assert refused.headers["Retry-After"] == str(body["retry_after"])
    assert_refused_in_stream(post(client, create_body("more")), "Too many requests")
    assert fake.count == 1
    other_network = post(app.test_client(), {"type": "threads.list", "params": {}},
                         environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert other_network.status_code == 200


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def limiter_storage(request: pytest.FixtureRequest) -> str:
    """The limiter's storage (the stream slots count in it): per process, or the real Redis."""
    if request.param == "memory":
        return "memory://"
    request.getfixturevalue("real_redis")
    return REDIS_URL


def test_one_visitor_may_stream_one_reply_at_a_time(
    make_app: Callable[..., Flask],
    fake: FakeResponses,
    mint_logs: pytest.LogCaptureFixture,
    limiter_storage: str,
) -> None:
    app = make_app(CHATKIT_MAX_STREAMS_PER_USER=1, RATELIMIT_STORAGE_URI=limiter_storage)
    first = app.test_client()
    first.get(CONFIG_URL)
    second = app.test_client()  # another tab of the same visitor
    second.set_cookie(COOKIE, first.get_cookie(COOKIE).value)
    slow_text = " ".join(f"word{i}" for i in range(12))
    fake.enqueue(Reply(text=slow_text, token_delay=0.15))
    results: dict[str, Any] = {}
    slow = threading.Thread(target=lambda: results.update(first=post(first, create_body("slow"))))
    slow.start()
    try:
        fake.wait_for(1)  # the first reply is streaming: its slot is taken

        refused = post(second, create_body("impatient"))
        assert_refused_in_stream(refused, "You already have replies on the way")
        assert fake.count == 1
        other = post(app.test_client(), create_body("someone else"))  # not affected
        assert answer(sse_events(other.data)) == "You said: someone else"
        assert slow.is_alive()  # both really were streaming at once
    finally:
        slow.join(20)
    assert answer(sse_events(results["first"].data)) == slow_text
    for text in ("now", "and now"):  # the slot was given back
        assert answer(sse_events(post(second, create_body(text)).data)) == f"You said: {text}"
    outcomes = [r.chatkit["outcome"] for r in mint_logs.records
                if r.name == "chatkit_flask.message" and r.chatkit["type"] == "threads.create"]
    assert outcomes.count("too_many_streams") == 1


def test_a_visitor_who_leaves_frees_the_slot_and_stops_the_model(
    make_app: Callable[..., Flask], fake: FakeResponses, mint_logs: pytest.LogCaptureFixture
) -> None:
    app = make_app(CHATKIT_MAX_STREAMS_PER_USER=1)
    client = app.test_client()
    fake.enqueue(Reply(text=" ".join(f"word{i}" for i in range(40)), token_delay=0.1))
    response = client.post(URL, data=json.dumps(create_body("a long one")),
                           content_type="application/json", buffered=False)
    frames = iter(response.response)
    first = [next(frames) for _ in range(5)]  # up to the first text delta
    assert b"thread.item.updated" in first[-1]
    response.close()  # what the WSGI server does when the browser goes away

    assert fake.wait_for_abort(1, timeout=3)
    assert fake.completed == 0
    again = post(client, create_body("back again"))
    assert answer(sse_events(again.data)) == "You said: back again"
    outcomes = [r.chatkit["outcome"] for r in mint_logs.records
                if r.name == "chatkit_flask.message"]
    assert outcomes == ["cancelled", "completed"]


def test_ratelimit_enabled_false_turns_every_limit_off(
    make_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    app = make_app(
        RATELIMIT_ENABLED=False,
        CHATKIT_RATELIMIT_PER_USER="1 per minute",
        CHATKIT_RATELIMIT_PER_IP="1 per minute",
        CHATKIT_RATELIMIT_GLOBAL="1 per minute",
        CHATKIT_RATELIMIT_REQUESTS_PER_IP="1 per minute",
        CHATKIT_MAX_STREAMS_PER_USER=1,
    )
    client = app.test_client()
    thread_id = create_thread(client, "one")
    for text in ("two", "three"):
        assert answer(sse_events(post(client, message_body(thread_id, text)).data)).endswith(text)
    for _ in range(3):
        assert thread_ids(client) == [thread_id]

    twin = app.test_client()
    twin.set_cookie(COOKIE, client.get_cookie(COOKIE).value)
    fake.enqueue(Reply(text="slow one two three four", token_delay=0.1))
    results: dict[str, Any] = {}
    slow = threading.Thread(target=lambda: results.update(first=post(client, create_body("a"))))
    slow.start()
    fake.wait_for(4)
    concurrent = post(twin, create_body("b"))
    slow.join(20)
    assert answer(sse_events(concurrent.data)) == "You said: b"
    assert answer(sse_events(results["first"].data)) == "slow one two three four"


# --------------------------------------------------------------- input rules
def test_a_message_too_long_is_400_before_the_model(
    make_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    app = make_app(CHATKIT_MAX_INPUT_CHARS=50)
    client = app.test_client()
    assert_json_error(post(client, create_body("x" * 51)), 400, "input_too_long")
    assert fake.count == 0 and thread_ids(client) == []
    thread_id = create_thread(client, "x" * 50)
    response = post(client, message_body(thread_id, "y" * 51))
    assert_json_error(response, 400, "input_too_long")
    assert fake.count == 1 and len(item_list(client, thread_id)) == 2


UNSUPPORTED = {
    "attachments.create": {"name": "a.png", "size": 1, "mime_type": "image/png"},
    "input.transcribe": {"audio_base64": "AAAA", "mime_type": "audio/webm"},
}


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED))
def test_unsupported_request_types_are_400(
    client: FlaskClient, fake: FakeResponses, kind: str
) -> None:
    response = post(client, {"type": kind, "params": UNSUPPORTED[kind]})
    assert_json_error(response, 400, "unsupported_request")
    assert fake.count == 0


def test_attachments_in_the_input_are_400(client: FlaskClient, fake: FakeResponses) -> None:
    body = {"type": "threads.create",
            "params": {"input": {**user_input("see the file"), "attachments": ["atc_1"]}}}
    assert_json_error(post(client, body), 400, "unsupported_request")
    assert fake.count == 0 and thread_ids(client) == []


MALFORMED = {
    "empty": b"",
    "not json": b"hello there",
    "truncated json": b'{"type": "threads.create", ',
    "json array": b'[{"type": "threads.list", "params": {}}]',
    "json string": b'"threads.list"',
    "json null": b"null",
    "no type": b'{"params": {}}',
    "type not a string": b'{"type": 7, "params": {}}',
    "unknown type": b'{"type": "threads.explode", "params": {}}',
    "missing params": b'{"type": "threads.create"}',
    "params not an object": b'{"type": "threads.list", "params": []}',
    "input a string": b'{"type": "threads.create", "params": {"input": "hi"}}',
    "content not a list": b'{"type": "threads.create", "params": {"input": {"content": 5}}}',
    "missing thread_id": b'{"type": "threads.get_by_id", "params": {}}',
    "thread_id a number": b'{"type": "items.list", "params": {"thread_id": 12}}',
    "limit a word": b'{"type": "threads.list", "params": {"limit": "many"}}',
    "bad order": b'{"type": "threads.list", "params": {"order": "sideways"}}',
    "bad feedback kind": b'{"type": "items.feedback", "params": '
                         b'{"thread_id": "t", "item_ids": [], "kind": "meh"}}',
    "deep nesting": b"[" * 20_000 + b"]" * 20_000,
    "not utf-8": b'{"type": "\xff\xfe"}',
}


def test_malformed_bodies_are_400_never_500(
    make_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    client = make_app(RATELIMIT_ENABLED=False).test_client()
    for name, body in MALFORMED.items():
        response = post(client, body)
        assert response.status_code == 400, (name, response.data[:300])
        assert_json_error(response, 400, {"invalid_request", "unsupported_request"})
    assert fake.count == 0
    wrong_type = client.post(URL, data=b'{"type": "threads.list", "params": {}}',
                             content_type="text/plain")
    assert_json_error(wrong_type, 415, "unsupported_media_type")
    assert_json_error(client.get(URL), 405, "method_not_allowed")


# Hypothesis: random JSON objects and ChatKit-shaped bodies.
def fast(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )


THREAD = "<the visitor's thread>"
ITEM = "<the first item of the visitor's thread>"
json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=20,
)
# Mostly well-formed (so that bodies get past validation into the SDK and the store), now and
# then a wrong value, a missing field or a stranger's id.
odd = json_values


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` four times in five, any JSON value otherwise."""
    return st.one_of(valid, valid, valid, valid, odd)


ids = st.sampled_from([THREAD, THREAD, ITEM, ITEM, "thr_missing", "msg_x", ""]) | st.text(
    max_size=20
)
text_part = st.fixed_dictionaries({"type": st.just("input_text"), "text": st.text(max_size=120)})
tag_part = st.fixed_dictionaries(
    {"type": st.just("input_tag"), "id": st.text(max_size=10), "text": st.text(max_size=30),
     "data": st.dictionaries(st.text(max_size=5), json_scalars, max_size=2),
     "interactive": st.booleans()},
    optional={"group": st.none() | st.text(max_size=5)},
)
inputs = st.fixed_dictionaries(
    {
        "content": mostly(st.lists(text_part | tag_part, min_size=1, max_size=3)),
        "attachments": mostly(st.just([])) | st.lists(st.text(max_size=8), max_size=2),
        "inference_options": mostly(st.just({}) | st.fixed_dictionaries(
            {}, optional={"model": st.none() | st.text(max_size=20), "tool_choice": odd})),
    },
    optional={"quoted_text": mostly(st.none() | st.text(max_size=60))},
)
pages = {"limit": mostly(st.none() | st.integers()), "after": mostly(st.none() | ids),
         "order": mostly(st.sampled_from(["asc", "desc"]))}
PARAMS: dict[str, dict[str, Any]] = {
    "threads.create": {"input": mostly(inputs)},
    "threads.add_user_message": {"thread_id": mostly(ids), "input": mostly(inputs)},
    "threads.retry_after_item": {"thread_id": mostly(ids), "item_id": mostly(ids)},
    "threads.add_client_tool_output": {"thread_id": mostly(ids), "result": json_values},
    "threads.get_by_id": {"thread_id": mostly(ids)},
    "threads.list": pages,
    "items.list": {"thread_id": mostly(ids), **pages},
    "threads.update": {"thread_id": mostly(ids), "title": mostly(st.text(max_size=250))},
    "threads.delete": {"thread_id": mostly(ids)},
    "items.feedback": {"thread_id": mostly(ids), "item_ids": mostly(st.lists(ids, max_size=3)),
                       "kind": mostly(st.sampled_from(["positive", "negative"]))},
    "threads.add_structured_input": {
        "thread_id": mostly(ids),
        "item_id": mostly(ids),  # the visitor's message: not a structured input item
        "input": mostly(st.fixed_dictionaries({}, optional={
            "status": mostly(st.sampled_from(["answered", "skipped"])),
            "answers": mostly(st.dictionaries(st.text(max_size=10), st.fixed_dictionaries(
                {"values": mostly(st.lists(st.text(max_size=120), max_size=3))},
                optional={"skipped": mostly(st.booleans())}), max_size=3)),
        })),
    },
}


def typed_body(kind: str, fields: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A body of ``kind``: every field, or (one time in three) any of them."""
    every = st.fixed_dictionaries(fields)
    some = st.fixed_dictionaries({}, optional=fields)
    return st.fixed_dictionaries(
        {"type": st.just(kind), "params": st.one_of(every, every, some)},
        optional={"metadata": st.dictionaries(st.text(max_size=8), json_scalars, max_size=3)},
    )


chatkit_bodies = st.one_of(
    *(typed_body(kind, fields) for kind, fields in PARAMS.items()),
    st.fixed_dictionaries(
        {"type": st.sampled_from(sorted(UNSUPPORTED_TYPES)) | st.text(max_size=20)},
        optional={"params": st.dictionaries(st.sampled_from(sorted({*PARAMS, "thread_id",
                                                                    "item_id", "input"})),
                                            json_values, max_size=4) | odd},
    ),
)
any_objects = st.dictionaries(st.text(max_size=12), json_values, max_size=6)


@pytest.fixture(scope="module")
def hostile(
    _fake: FakeResponses, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One app (limits off) and a visitor who owns a thread, for every example."""
    path = tmp_path_factory.mktemp("hostile") / "threads.db"
    app = create_app(server_config(_fake, f"sqlite:///{path}", RATELIMIT_ENABLED=False,
                                   CHATKIT_MAX_INPUT_CHARS=200), environ={})
    target: dict[str, Any] = {"client": app.test_client()}
    aim(target)
    yield target
    close_app(app)


def aim(target: dict[str, Any]) -> None:
    """Give the visitor a fresh thread to aim at (its id and its first item's id)."""
    thread_id = create_thread(target["client"], "a thread to aim at")
    target[THREAD] = thread_id
    target[ITEM] = item_list(target["client"], thread_id)[0]["id"]


def aimed(value: Any, target: dict[str, Any]) -> Any:
    if isinstance(value, str) and value in (THREAD, ITEM):
        return target[value]
    if isinstance(value, dict):
        return {k: aimed(v, target) for k, v in value.items()}
    if isinstance(value, list):
        return [aimed(v, target) for v in value]
    return value


def check_answer(response: Any) -> None:
    """A documented status; an error is the JSON shape; a stream ends in an answer or in a
    generic error event."""
    # 409: a client tool output for a thread that waits on no client tool call.
    assert response.status_code in (200, 400, 404, 409, 413, 415), response.data[:300]
    if response.status_code >= 400:
        assert response.mimetype == "application/json"
        assert {"error", "message", "request_id"} <= set(response.get_json())
    elif response.mimetype == "text/event-stream":
        events = sse_events(response.data)
        if events:  # (retrying after an item that is not in the thread has nothing to say)
            last = events[-1]
            assert last["type"] in ("thread.item.done", "error"), events
            if last["type"] == "error":
                assert last["message"] in (FAILED_MESSAGE, BUSY_MESSAGE), last


@fast(300)
@given(body=chatkit_bodies)
def test_any_chatkit_shaped_body_is_never_a_5xx(
    hostile: dict[str, Any], fake: FakeResponses, body: dict[str, Any]
) -> None:
    body = aimed(body, hostile)
    calls = fake.count
    response = post(hostile["client"], body)
    check_answer(response)
    if fake.count > calls:  # only a valid message reaches the model
        assert body["type"] in STREAMING_TYPES and response.status_code == 200
    if body["type"] == "threads.delete" and response.status_code == 200:
        aim(hostile)


@fast(150)
@given(body=any_objects)
def test_any_json_object_is_never_a_5xx(
    hostile: dict[str, Any], fake: FakeResponses, body: dict[str, Any]
) -> None:
    calls = fake.count
    check_answer(post(hostile["client"], body))
    assert fake.count == calls


# ------------------------------------------------------------ model failures
@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply.error(500, f"boom: {UPSTREAM_SECRET}"), FAILED_MESSAGE),
        (Reply.broken(after_tokens=2), FAILED_MESSAGE),
        (Reply.error(429, f"slow down: {UPSTREAM_SECRET}"), BUSY_MESSAGE),
    ],
    ids=["500", "broken-mid-stream", "429"],
)
def test_a_model_failure_is_a_generic_error_event_and_the_next_message_works(
    client: FlaskClient, fake: FakeResponses, reply: Reply, message: str, store_url: str
) -> None:
    fake.enqueue(reply)
    response = post(client, create_body("one two three four five"))

    assert_stream_headers(response)
    assert response.data.endswith(b"\n\n")  # ended cleanly, on a frame boundary
    events = sse_events(response.data)
    assert events[0]["type"] == "thread.created"
    assert events[-1] == {"type": "error", "code": "custom", "message": message,
                          "allow_retry": True}
    assert [e["type"] for e in events].count("error") == 1
    text = response.get_data(as_text=True)
    assert UPSTREAM_SECRET not in text and "server had an error" not in text
    assert fake.count == 1  # not retried behind the visitor's back

    thread_id = events[0]["thread"]["id"]
    again = post(client, message_body(thread_id, "again"))
    assert answer(sse_events(again.data)) == "You said: again"


def test_a_model_that_goes_silent_ends_the_stream_with_an_error_event(
    make_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    client = make_app(CHATKIT_MODEL_TIMEOUT=1).test_client()
    fake.enqueue(Reply.hang(after_tokens=2))
    response = post(client, create_body("one two three four five"))

    assert_stream_headers(response)
    events = sse_events(response.data)
    assert "thread.item.updated" in [e["type"] for e in events]  # some text had arrived
    assert events[-1]["type"] == "error" and events[-1]["message"] == FAILED_MESSAGE
    assert fake.wait_for_abort(1)  # the model request was given up, not left open
    thread_id = events[0]["thread"]["id"]
    assert answer(sse_events(post(client, message_body(thread_id, "hello")).data)) == (
        "You said: hello")


@pytest.mark.parametrize(
    ("reply", "timeout"),
    # The cut comes after the deltas have arrived (a reset would discard unread ones).
    [(Reply(break_after=3, token_delay=0.05), 10), (Reply.hang(after_tokens=3), 1)],
    ids=["cut-mid-stream", "silent-mid-stream"],
)
def test_an_answer_cut_by_the_model_is_stored_as_the_visitor_saw_it(
    make_app: Callable[..., Flask],
    store_url: str,
    fake: FakeResponses,
    reply: Reply,
    timeout: int,
) -> None:
    client = make_app(store_url, CHATKIT_MODEL_TIMEOUT=timeout).test_client()
    fake.enqueue(reply)

    events = sse_events(post(client, create_body("one two three four five")).data)
    thread_id = events[0]["thread"]["id"]
    seen = "".join(e["update"]["delta"] for e in events
                   if e["type"] == "thread.item.updated" and "delta" in e["update"])
    stored = item_list(client, thread_id)
    post(client, message_body(thread_id, "and then?"))
    history = json.dumps(fake.requests[-1].json["input"])

    assert seen and events[-1]["type"] == "error"
    done = [e["item"] for e in events if e["type"] == "thread.item.done"]
    assert done[-1]["type"] == "assistant_message"  # the widget shows it as finished
    assert done[-1]["content"][0]["text"] == seen
    assistant = [i for i in stored if i["type"] == "assistant_message"]
    assert [a["content"][0]["text"] for a in assistant] == [seen]  # kept on reload
    assert "cut off before it was finished" in history  # the next turn knows it was cut
    assert "cut off" not in json.dumps(stored)  # the note is hidden from the visitor


@pytest.fixture(params=["sqlite", "redis"])
def breakable_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, Callable[[], None]]]:
    """A store that works at start-up (which refuses a broken one) and a function that breaks
    it: the SQLite file replaced by a directory, the private redis-server killed."""
    if request.param == "sqlite":
        path = tmp_path / "threads.db"

        def replace_by_directory() -> None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            path.mkdir()

        yield f"sqlite:///{path}", replace_by_directory
        return
    from chatkit_flask.testing.redis_server import RedisServer
    from tests.services import start_redis_or_skip

    own = start_redis_or_skip(RedisServer())
    yield own.url(), own.kill
    own.stop()


def test_a_store_outage_is_a_503_that_names_the_store(
    make_app: Callable[..., Flask],
    fake: FakeResponses,
    breakable_store: tuple[str, Callable[[], None]],
    mint_logs: pytest.LogCaptureFixture,
) -> None:
    url, break_store = breakable_store
    client = make_app(url).test_client()
    break_store()
    for body in ({"type": "threads.list", "params": {}}, create_body("hi")):
        response = post(client, body)
        error = assert_json_error(response, 503, "store_unavailable")  # before any stream byte
        assert "conversations" in error["message"] and response.headers["Retry-After"]
    assert fake.count == 0
    failures = [r.getMessage() for r in mint_logs.records
                if r.name.startswith("chatkit_flask") and r.levelno >= logging.ERROR]
    assert len(failures) == 2 and all("thread store" in line for line in failures), failures
    assert not any("rate limit storage" in r.getMessage() for r in mint_logs.records)


# ---------------------------------------------------------- start-up errors
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"CHATKIT_AGENT": "not a spec"}, "CHATKIT_AGENT"),
        ({"CHATKIT_AGENT": "no_such_module_for_chatkit:agent"}, "CHATKIT_AGENT"),
        ({"CHATKIT_AGENT": "os.path:sep"}, "CHATKIT_AGENT"),
        ({"CHATKIT_AGENT": "chatkit_flask.server.agent:no_such_agent"}, "CHATKIT_AGENT"),
        ({"CHATKIT_AGENT_INSTRUCTIONS": "@/no/such/dir/instructions.md"},
         "CHATKIT_AGENT_INSTRUCTIONS"),
        ({"CHATKIT_STORE_URL": "postgres://db/threads"}, "CHATKIT_STORE_URL"),
        ({"CHATKIT_STORE_URL": "threads.db"}, "CHATKIT_STORE_URL"),
        ({"CHATKIT_STORE_URL": "sqlite:////no/such/dir/threads.db"}, "CHATKIT_STORE_URL"),
        ({"CHATKIT_STORE_URL": "sqlite:///:memory:"}, "CHATKIT_STORE_URL"),
        ({"CHATKIT_STORE_URL": "redis://cache.example:6379/typo"}, "CHATKIT_STORE_URL"),
        ({"CHATKIT_STORE_URL": "redis://127.0.0.1:port/0"}, "CHATKIT_STORE_URL"),
        ({"CHATKIT_BACKEND": "serverless"}, "CHATKIT_BACKEND"),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(map(str, value.values())),
)
def test_a_bad_server_setting_stops_start_up_naming_the_key(
    fake: FakeResponses, sqlite_url: str, overrides: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        create_app(server_config(fake, sqlite_url, **overrides), environ={})
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")
    assert TEST_API_KEY not in str(caught.value)


def test_a_bad_key_from_the_environment_is_named_too(fake: FakeResponses, sqlite_url: str) -> None:
    config = server_config(fake, sqlite_url)
    del config["CHATKIT_AGENT_INSTRUCTIONS"]
    with pytest.raises(ConfigError) as caught:
        create_app(config, environ={"CHATKIT_AGENT_INSTRUCTIONS": "@missing-instructions.md"})
    assert caught.value.key == "CHATKIT_AGENT_INSTRUCTIONS"


def test_a_store_password_never_appears_in_the_error(fake: FakeResponses, sqlite_url: str) -> None:
    url = "redis://user:hunter2-store-password@cache.example:6379/typo"
    with pytest.raises(ConfigError) as caught:
        create_app(server_config(fake, sqlite_url, CHATKIT_STORE_URL=url), environ={})
    assert caught.value.key == "CHATKIT_STORE_URL"
    assert "hunter2" not in str(caught.value)


def test_hosted_mode_still_needs_a_workflow_id(fake: FakeResponses, sqlite_url: str) -> None:
    config = {**server_config(fake, sqlite_url), "CHATKIT_BACKEND": "hosted"}
    with pytest.raises(ConfigError) as caught:
        create_app(config, environ={})
    assert caught.value.key == "CHATKIT_WORKFLOW_ID"
    del config["CHATKIT_BACKEND"]  # unnamed: the workflow id chooses hosted mode
    hosted = create_app({**config, "CHATKIT_WORKFLOW_ID": WORKFLOW}, environ={})
    assert hosted.extensions["chatkit"].server is None


# ------------------------------------------------------------ logs, secrets
SECRET_TEXT = "my-private-words-zebra-4711"


def record_text(record: logging.LogRecord) -> str:
    text = record.getMessage() + repr(getattr(record, "chatkit", ""))
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    return text


def test_one_log_line_per_request_and_no_secrets(
    make_app: Callable[..., Flask], fake: FakeResponses, mint_logs: pytest.LogCaptureFixture
) -> None:
    app = make_app(CHATKIT_RATELIMIT_PER_USER="2 per minute", CHATKIT_MAX_INPUT_CHARS=100)
    client = app.test_client()
    other = app.test_client()
    fake.enqueue(f"I heard {SECRET_TEXT}.")
    responses = []

    def send(who: FlaskClient, body: Any) -> Any:
        response = post(who, body)
        responses.append(response)
        return response

    created = send(client, create_body(f"please keep {SECRET_TEXT}"))
    thread_id = sse_events(created.data)[0]["thread"]["id"]
    fake.enqueue(Reply.error(500, f"upstream echoes {SECRET_TEXT} and {TEST_API_KEY}"))
    send(client, message_body(thread_id, f"again {SECRET_TEXT}"))
    send(client, {"type": "threads.list", "params": {}})
    send(client, {"type": "items.list", "params": {"thread_id": thread_id}})
    send(other, {"type": "threads.get_by_id", "params": {"thread_id": thread_id}})  # 404
    send(client, create_body(SECRET_TEXT * 10))  # 400: too long
    malformed = {"type": "threads.create", "params": {"input": SECRET_TEXT}}
    send(client, json.dumps(malformed).encode())  # 400: not a ChatKit request
    send(client, create_body(f"over the limit {SECRET_TEXT}"))  # refused in stream
    send(client, {"type": "input.transcribe", "params": {"audio_base64": SECRET_TEXT,
                                                          "mime_type": "audio/webm"}})

    lines = [r for r in mint_logs.records if r.name == "chatkit_flask.message"]
    assert [r.chatkit["request_id"] for r in lines] == [
        r.headers["X-Request-ID"] for r in responses]
    assert [r.chatkit["status"] for r in lines] == [r.status_code for r in responses]
    assert [r.chatkit["outcome"] for r in lines][:3] == ["completed", "failed", "answered"]
    assert lines[-2].chatkit["outcome"] == "rate_limited" and lines[-2].chatkit["scope"] == "user"
    assert lines[-2].levelno == logging.WARNING and lines[0].levelno == logging.INFO
    assert lines[1].chatkit["thread"] not in (thread_id, "-")  # a tag, not the id
    as_json = [json.loads(JsonFormatter().format(r)) for r in lines]  # CHATKIT_LOG_FORMAT=json
    assert {entry["event"] for entry in as_json} == {"message"}
    assert [entry["request_id"] for entry in as_json] == [r.chatkit["request_id"] for r in lines]

    cookies = [c.get_cookie(COOKIE).value for c in (client, other)]
    secrets = [SECRET_TEXT, TEST_API_KEY, TEST_SECRET_KEY, *cookies,
               *(cookie.partition(".")[0] for cookie in cookies)]  # the raw visitor ids
    for record in mint_logs.records:
        text = record_text(record)
        for secret in secrets:
            assert secret not in text, (secret, record.name, text)
    for response in responses:
        if response.status_code >= 400 or response.mimetype == "text/event-stream":
            body = response.get_data(as_text=True)
            errors = body if response.status_code >= 400 else "".join(
                json.dumps(e) for e in sse_events(response.data) if e["type"] == "error")
            for secret in (SECRET_TEXT, TEST_API_KEY, *cookies):
                assert secret not in errors, (secret, body[:300])
