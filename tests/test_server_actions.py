"""Widget actions in server mode, as a site registers them (``@chatkit.action``) and a visitor's
widget sends them, through the Flask test client against the fake Responses API.

What a site may rely on: a registered streaming action answers with its events (a widget, a
model turn) and they are stored; a sync action's updated widget is returned and stored; the
handler runs in the host's app context with the caller's thread and sender; another owner's
thread or item is a 404 before the handler runs; an unknown name or an oversized payload is a
400; a streaming action counts against the message limits like a message.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

# chatkit_flask.server first: it silences the SDK's own deprecation warning at import.
pytest.importorskip("chatkit_flask.server.actions")

import redis
from chatkit.actions import ActionConfig
from chatkit.types import ThreadItem, ThreadItemDoneEvent, ThreadStreamEvent, WidgetItem
from chatkit.widgets import Button, Card, Text
from flask import Flask, current_app, request

from chatkit_flask import ChatKit
from chatkit_flask.server.actions import ActionContext
from chatkit_flask.server.protocol import FAILED_MESSAGE, MAX_ACTION_PAYLOAD_BYTES
from chatkit_flask.testing.fake_responses import FakeResponses
from tests.conftest import TEST_API_KEY
from tests.server_support import sse_events
from tests.test_server_mode import (
    STORE_REDIS_URL,
    answer,
    assert_json_error,
    assert_refused_in_stream,
    assert_stream_headers,
    close_app,
    create_body,
    create_thread,
    item_list,
    post,
    server_config,
)

# Sites should build widgets from templates; plain classes keep these tests short.
pytestmark = pytest.mark.filterwarnings("ignore:Direct usage of named widget classes")


@pytest.fixture(scope="module")
def _fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=TEST_API_KEY) as server:
        yield server


@pytest.fixture
def fake(_fake: FakeResponses) -> FakeResponses:
    _fake.clear()  # echoes the last user message
    return _fake


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Both thread stores: a SQLite file, or the suite's Redis (its own database, emptied)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/threads.db"
        return
    request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(STORE_REDIS_URL, socket_timeout=1)
    client.flushdb()
    yield STORE_REDIS_URL
    client.flushdb()
    client.close()


def slots_widget(text: str) -> Card:
    book = ActionConfig(type="book_slot", payload={"slot": "10:00"}, streaming=False)
    return Card(children=[Text(value=text), Button(label="Book", onClickAction=book)])


@pytest.fixture
def calls() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def site(fake: FakeResponses, store_url: str, calls: list[dict[str, Any]]) -> Iterator[Flask]:
    app = booking_site(fake, store_url, calls, CHATKIT_RATELIMIT_PER_USER="3 per minute")
    yield app
    close_app(app)


def booking_site(
    fake: FakeResponses, store_url: str, calls: list[dict[str, Any]], **config: Any
) -> Flask:
    """A site with actions: one shows a widget, one books from it (sync), one asks the model,
    two fail. Each records what it was called with."""
    app = Flask("booking_site")
    app.config.update(server_config(fake, store_url, **config))
    chatkit = ChatKit(app)

    @chatkit.user_loader
    def current_user() -> str | None:
        return request.headers.get("X-User")

    def record(ctx: ActionContext) -> None:
        calls.append(
            {
                "name": ctx.action.type,
                "app": current_app.name,
                "thread": ctx.thread.id,
                "sender": ctx.sender.id if ctx.sender else None,
                "payload": ctx.payload,
                "user": ctx.context.user_id,
            }
        )

    @chatkit.action("show_slots")
    async def show_slots(ctx: ActionContext) -> AsyncIterator[ThreadStreamEvent]:
        record(ctx)
        widget = WidgetItem(
            id=ctx.new_item_id("message"),
            thread_id=ctx.thread.id,
            created_at=datetime.now(),
            widget=slots_widget("10:00 is free"),
        )
        yield ThreadItemDoneEvent(item=widget)

    @chatkit.action("book_slot", sync=True)
    async def book_slot(ctx: ActionContext) -> ThreadItem | None:
        record(ctx)
        assert ctx.sender is not None
        booked = slots_widget(f"Booked {ctx.payload['slot']}")
        return ctx.sender.model_copy(update={"widget": booked})

    @chatkit.action("ask_model")
    async def ask_model(ctx: ActionContext) -> AsyncIterator[ThreadStreamEvent]:
        record(ctx)
        async for event in ctx.model_turn():
            yield event

    @chatkit.action("broken")
    async def broken(ctx: ActionContext) -> AsyncIterator[ThreadStreamEvent]:
        raise RuntimeError("secret-detail-of-the-site")
        yield  # an async generator

    @chatkit.action("broken_sync", sync=True)
    async def broken_sync(ctx: ActionContext) -> ThreadItem | None:
        raise RuntimeError("secret-detail-of-the-site")

    return app


def action_body(
    thread_id: str, name: str, item_id: str | None = None, payload: Any = None, sync: bool = False
) -> dict[str, Any]:
    kind = "threads.sync_custom_action" if sync else "threads.custom_action"
    params: dict[str, Any] = {"thread_id": thread_id, "action": {"type": name, "payload": payload}}
    if item_id is not None:
        params["item_id"] = item_id
    return {"type": kind, "params": params}


def show_widget(client: Any, thread_id: str, **kwargs: Any) -> dict[str, Any]:
    response = post(client, action_body(thread_id, "show_slots", payload={"day": "mon"}), **kwargs)
    assert_stream_headers(response)
    (done,) = [e for e in sse_events(response.data) if e["type"] == "thread.item.done"]
    return done["item"]


def widget_texts(item: dict[str, Any]) -> list[str]:
    return [child["value"] for child in item["widget"]["children"] if child["type"] == "Text"]


def test_a_streaming_action_answers_with_a_widget_that_is_stored(
    site: Flask, calls: list[dict[str, Any]]
) -> None:
    client = site.test_client()
    alice = {"X-User": "alice"}
    created = post(client, create_body("hello"), headers=alice)
    thread_id = sse_events(created.data)[0]["thread"]["id"]
    widget = show_widget(client, thread_id, headers=alice)
    assert widget["type"] == "widget" and widget_texts(widget) == ["10:00 is free"]
    params = {"thread_id": thread_id, "order": "asc"}
    listed = post(client, {"type": "items.list", "params": params}, headers=alice)
    assert [item["id"] for item in listed.get_json()["data"]][-1] == widget["id"]
    assert calls == [
        {
            "name": "show_slots",
            "app": "booking_site",
            "thread": thread_id,
            "sender": None,
            "payload": {"day": "mon"},
            "user": "alice",
        }
    ]


def test_a_sync_action_returns_and_stores_the_updated_widget(
    site: Flask, calls: list[dict[str, Any]]
) -> None:
    client = site.test_client()
    thread_id = create_thread(client)
    widget = show_widget(client, thread_id)
    response = post(
        client, action_body(thread_id, "book_slot", widget["id"], {"slot": "10:00"}, sync=True)
    )
    assert response.status_code == 200, response.data
    updated = response.get_json()["updated_item"]
    assert updated["id"] == widget["id"] and widget_texts(updated) == ["Booked 10:00"]
    assert widget_texts(item_list(client, thread_id)[-1]) == ["Booked 10:00"]
    assert calls[-1]["sender"] == widget["id"] and calls[-1]["app"] == "booking_site"


def test_an_action_can_start_a_model_turn(site: Flask, fake: FakeResponses) -> None:
    client = site.test_client()
    thread_id = create_thread(client, "which slots?")
    before = fake.count
    response = post(client, action_body(thread_id, "ask_model"))
    assert_stream_headers(response)
    assert answer(sse_events(response.data)) == "You said: which slots?"
    assert fake.count == before + 1


def test_another_owners_thread_or_item_is_404_and_the_handler_never_runs(
    site: Flask, calls: list[dict[str, Any]]
) -> None:
    owner = site.test_client()
    thread_id = create_thread(owner)
    widget = show_widget(owner, thread_id)
    calls.clear()
    stranger = site.test_client()
    other_thread = create_thread(stranger)
    for client, body in [
        (stranger, action_body(thread_id, "show_slots")),
        (stranger, action_body(thread_id, "book_slot", widget["id"], sync=True)),
        # The stranger's own thread with the owner's widget: the item is not in it.
        (stranger, action_body(other_thread, "book_slot", widget["id"], sync=True)),
        (stranger, action_body(other_thread, "show_slots", widget["id"])),
    ]:
        assert_json_error(post(client, body), 404, "not_found")
    assert calls == []
    assert widget_texts(item_list(owner, thread_id)[-1]) == ["10:00 is free"]


def test_an_unknown_action_or_the_wrong_kind_is_400(
    site: Flask, calls: list[dict[str, Any]]
) -> None:
    client = site.test_client()
    thread_id = create_thread(client)
    for body in (
        action_body(thread_id, "delete_everything"),
        action_body(thread_id, "book_slot"),  # a sync action sent as streaming
        action_body(thread_id, "show_slots", sync=True),
    ):
        assert_json_error(post(client, body), 400, "unsupported_action")
    assert calls == []


def test_an_oversized_payload_is_400(site: Flask, calls: list[dict[str, Any]]) -> None:
    client = site.test_client()
    thread_id = create_thread(client)
    big = {"note": "x" * MAX_ACTION_PAYLOAD_BYTES}
    assert_json_error(
        post(client, action_body(thread_id, "show_slots", payload=big)), 400, "invalid_request"
    )
    fits = {"note": "x" * (MAX_ACTION_PAYLOAD_BYTES - 100)}
    assert post(client, action_body(thread_id, "show_slots", payload=fits)).status_code == 200
    assert [call["name"] for call in calls] == ["show_slots"]


def test_a_streaming_action_counts_against_the_per_user_message_limit(
    site: Flask, calls: list[dict[str, Any]], fake: FakeResponses
) -> None:
    client = site.test_client()
    thread_id = create_thread(client)  # 1 of 3
    show_widget(client, thread_id)  # 2
    post(client, action_body(thread_id, "ask_model"))  # 3
    count = fake.count
    refused = post(client, action_body(thread_id, "ask_model"))
    assert_refused_in_stream(refused, "too many messages")
    assert fake.count == count and len(calls) == 2
    # Reads and sync actions are not messages.
    assert post(client, {"type": "threads.list", "params": {}}).status_code == 200


def test_an_action_sent_from_an_item_that_is_not_a_widget_is_refused_before_the_handler(
    site: Flask, calls: list[dict[str, Any]]
) -> None:
    client = site.test_client()
    thread_id = create_thread(client)
    message_id = item_list(client, thread_id)[0]["id"]  # the visitor's own message
    response = post(client, action_body(thread_id, "book_slot", message_id, sync=True))
    assert_json_error(response, 400, "invalid_request")
    response = post(client, action_body(thread_id, "show_slots", message_id))
    (event,) = sse_events(response.data)
    assert event["type"] == "error"
    assert calls == []


def test_a_failing_handler_is_a_generic_error_and_its_text_is_not_logged(
    site: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client = site.test_client()
    thread_id = create_thread(client)
    response = post(client, action_body(thread_id, "broken"))
    assert_stream_headers(response)
    error = sse_events(response.data)[-1]
    assert error["type"] == "error" and error["allow_retry"] is True
    assert error["message"] == FAILED_MESSAGE
    response = post(client, action_body(thread_id, "broken_sync", sync=True))
    assert_json_error(response, 500, "action_failed")
    assert "secret-detail" not in response.get_data(as_text=True)
    assert "secret-detail" not in caplog.text
    assert caplog.text.count("action broken") == 2  # broken, broken_sync: class names only


def test_an_actions_model_turn_is_charged_to_the_token_budget_which_then_refuses_it(
    fake: FakeResponses, store_url: str, calls: list[dict[str, Any]]
) -> None:
    app = booking_site(fake, store_url, calls, CHATKIT_TOKENS_PER_USER="100 per day")
    try:
        client = app.test_client()
        thread_id = create_thread(client, "a first question that costs tokens")
        while True:  # only the actions' model turns from here on
            time.sleep(0.2)  # the charge is made off the event loop, once the stream ends
            events = sse_events(post(client, action_body(thread_id, "ask_model")).data)
            if events[0]["type"] == "error":
                break
            assert len(calls) < 20, "the budget never ran out"
        assert "share of the assistant" in events[0]["message"]
        count, ran = fake.count, len(calls)
        assert ran >= 1  # model turns of actions spent the budget (uncharged, it never ends)
        refused = sse_events(post(client, action_body(thread_id, "show_slots")).data)
        assert [event["type"] for event in refused] == ["error"]
        assert fake.count == count and len(calls) == ran  # neither the handler nor the model
    finally:
        close_app(app)


def test_a_handler_of_the_wrong_kind_or_a_second_one_is_refused_at_registration() -> None:
    chatkit = ChatKit()

    async def returns(ctx: ActionContext) -> None:
        return None

    async def streams(ctx: ActionContext) -> AsyncIterator[ThreadStreamEvent]:
        return
        yield

    with pytest.raises(TypeError, match="'show' needs an 'async def' handler that yields"):
        chatkit.action("show")(returns)
    with pytest.raises(TypeError, match="sync action 'book' needs an 'async def' handler"):
        chatkit.action("book", sync=True)(streams)
    chatkit.action("show")(streams)
    with pytest.raises(ValueError, match="'show' already has a handler"):
        chatkit.action("show", sync=True)(returns)
