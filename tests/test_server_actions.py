"""Widget actions in server mode, as a site registers them (``@chatkit.action``) and a visitor's
widget sends them, driven as the widget does (``chatkit_flask.testing.ChatKitDriver`` on the
Flask test client) against the fake Responses API.

What a site may rely on: a registered streaming action answers with its events (a widget, a
model turn) and they are stored; a sync action's updated widget is returned and stored; the
handler runs in the host's app context with the caller's thread and sender; another owner's
thread or item is a 404 before the handler runs; an unknown name or an oversized payload is a
400; a streaming action counts against the message limits like a message.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from typing import Any

import pytest

# chatkit_flask.server first: it silences the SDK's own deprecation warning at import.
pytest.importorskip("chatkit_flask.server.actions")

from chatkit.actions import ActionConfig
from chatkit.types import ThreadItem, ThreadItemDoneEvent, ThreadStreamEvent, WidgetItem
from chatkit.widgets import Button, Card, Text
from flask import Flask, current_app, request

from chatkit_flask import ChatKit
from chatkit_flask.server.actions import ActionContext
from chatkit_flask.server.protocol import FAILED_MESSAGE, MAX_ACTION_PAYLOAD_BYTES
from chatkit_flask.testing import ChatKitDriver, ChatKitHTTPError
from chatkit_flask.testing.fake_responses import FakeResponses
from tests.test_server_mode import (
    assert_json_error,
    assert_refused_in_stream,
    assert_stream_headers,
    close_app,
    server_config,
)

# Sites should build widgets from templates; plain classes keep these tests short.
pytestmark = pytest.mark.filterwarnings("ignore:Direct usage of named widget classes")


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


def show_widget(chat: ChatKitDriver) -> dict[str, Any]:
    shown = chat.action("show_slots", {"day": "mon"})
    assert_stream_headers(shown.response)
    (widget,) = shown.widgets
    return widget


def widget_texts(item: dict[str, Any]) -> list[str]:
    return [child["value"] for child in item["widget"]["children"] if child["type"] == "Text"]


def refused(send: Callable[[], Any], status: int, code: str) -> ChatKitHTTPError:
    """The JSON refusal ``send()`` is answered with (its status and error code)."""
    with pytest.raises(ChatKitHTTPError) as error:
        send()
    assert_json_error(error.value.response, status, code)
    return error.value


def test_a_streaming_action_answers_with_a_widget_that_is_stored(
    site: Flask, calls: list[dict[str, Any]]
) -> None:
    alice = ChatKitDriver(site.test_client(), headers={"X-User": "alice"})
    thread_id = alice.send("hello").thread_id
    widget = show_widget(alice)
    assert widget["type"] == "widget" and widget_texts(widget) == ["10:00 is free"]
    assert alice.items()[-1] == widget
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
    chat = ChatKitDriver(site.test_client())
    chat.send("hello")
    widget = show_widget(chat)
    updated = chat.sync_action("book_slot", {"slot": "10:00"}, item_id=widget["id"])
    assert updated is not None
    assert updated["id"] == widget["id"] and widget_texts(updated) == ["Booked 10:00"]
    assert widget_texts(chat.items()[-1]) == ["Booked 10:00"]
    assert calls[-1]["sender"] == widget["id"] and calls[-1]["app"] == "booking_site"


def test_an_action_can_start_a_model_turn(site: Flask, fake: FakeResponses) -> None:
    chat = ChatKitDriver(site.test_client())
    chat.send("which slots?")
    before = fake.count
    turn = chat.action("ask_model")
    assert_stream_headers(turn.response)
    assert turn.text == "You said: which slots?" and turn.types[-1] == "thread.item.done"
    assert fake.count == before + 1


def test_another_owners_thread_or_item_is_404_and_the_handler_never_runs(
    site: Flask, calls: list[dict[str, Any]]
) -> None:
    owner = ChatKitDriver(site.test_client())
    thread_id = owner.send("hello").thread_id
    widget = show_widget(owner)
    calls.clear()
    stranger = ChatKitDriver(site.test_client())
    stranger.send("mine")  # the stranger's own thread
    for send in (
        lambda: stranger.action("show_slots", thread_id=thread_id),
        lambda: stranger.sync_action("book_slot", item_id=widget["id"], thread_id=thread_id),
        # The stranger's own thread with the owner's widget: the item is not in it.
        lambda: stranger.sync_action("book_slot", item_id=widget["id"]),
        lambda: stranger.action("show_slots", item_id=widget["id"]),
    ):
        refused(send, 404, "not_found")
    assert calls == []
    assert widget_texts(owner.items()[-1]) == ["10:00 is free"]


def test_an_unknown_action_or_the_wrong_kind_is_400(
    site: Flask, calls: list[dict[str, Any]]
) -> None:
    chat = ChatKitDriver(site.test_client())
    chat.send("hello")
    refused(lambda: chat.action("delete_everything"), 400, "unsupported_action")
    refused(lambda: chat.action("book_slot"), 400, "unsupported_action")  # sync, sent streaming
    refused(lambda: chat.sync_action("show_slots"), 400, "unsupported_action")
    assert calls == []


def test_an_oversized_payload_is_400(site: Flask, calls: list[dict[str, Any]]) -> None:
    chat = ChatKitDriver(site.test_client())
    chat.send("hello")
    big = {"note": "x" * MAX_ACTION_PAYLOAD_BYTES}
    refused(lambda: chat.action("show_slots", big), 400, "invalid_request")
    fits = {"note": "x" * (MAX_ACTION_PAYLOAD_BYTES - 100)}
    assert chat.action("show_slots", fits).widgets
    assert [call["name"] for call in calls] == ["show_slots"]


def test_a_streaming_action_counts_against_the_per_user_message_limit(
    site: Flask, calls: list[dict[str, Any]], fake: FakeResponses
) -> None:
    chat = ChatKitDriver(site.test_client())
    chat.send("hello")  # 1 of 3
    show_widget(chat)  # 2
    chat.action("ask_model")  # 3
    count = fake.count
    over = chat.action("ask_model")
    assert_refused_in_stream(over.response, "too many messages")
    assert fake.count == count and len(calls) == 2
    # Reads and sync actions are not messages.
    assert chat.threads()


def test_an_action_sent_from_an_item_that_is_not_a_widget_is_refused_before_the_handler(
    site: Flask, calls: list[dict[str, Any]]
) -> None:
    chat = ChatKitDriver(site.test_client())
    chat.send("hello")
    message_id = chat.items()[0]["id"]  # the visitor's own message
    refused(lambda: chat.sync_action("book_slot", item_id=message_id), 400, "invalid_request")
    stream = chat.action("show_slots", item_id=message_id)
    assert stream.types == ["error"]
    assert calls == []


def test_a_failing_handler_is_a_generic_error_and_its_text_is_not_logged(
    site: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    chat = ChatKitDriver(site.test_client())
    chat.send("hello")
    stream = chat.action("broken")
    assert_stream_headers(stream.response)
    assert stream.errors[-1]["allow_retry"] is True and stream.error == FAILED_MESSAGE
    error = refused(lambda: chat.sync_action("broken_sync"), 500, "action_failed")
    assert "secret-detail" not in error.response.get_data(as_text=True)
    assert "secret-detail" not in caplog.text
    assert caplog.text.count("action broken") == 2  # broken, broken_sync: class names only


def test_an_actions_model_turn_is_charged_to_the_token_budget_which_then_refuses_it(
    fake: FakeResponses, store_url: str, calls: list[dict[str, Any]]
) -> None:
    app = booking_site(fake, store_url, calls, CHATKIT_TOKENS_PER_USER="100 per day")
    try:
        chat = ChatKitDriver(app.test_client())
        chat.send("a first question that costs tokens")
        while True:  # only the actions' model turns from here on
            time.sleep(0.2)  # the charge is made off the event loop, once the stream ends
            turn = chat.action("ask_model")
            if turn.types[0] == "error":
                break
            assert len(calls) < 20, "the budget never ran out"
        assert "share of the assistant" in (turn.error or "")
        count, ran = fake.count, len(calls)
        assert ran >= 1  # model turns of actions spent the budget (uncharged, it never ends)
        assert chat.action("show_slots").types == ["error"]
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
