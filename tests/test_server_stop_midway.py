"""The stop button (the client closes the stream) while a server tool or a streaming action
handler is mid-way, on both thread stores, through the Flask test client.

What a site may rely on: the tool or handler is cancelled where it waits (it does not run on);
what was finished before the stop stays in the thread, a widget still streaming is not stored
half-made, and the thread stays usable: ``items.list`` answers, and the next message is
answered with a model request the provider accepts (no function call without its output).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import pytest

# chatkit_flask.server first: it silences the SDK's own deprecation warning at import.
pytest.importorskip("chatkit_flask.server.protocol")

from agents import Agent, RunContextWrapper, function_tool
from chatkit.agents import AgentContext
from chatkit.types import (
    ProgressUpdateEvent,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadStreamEvent,
    WidgetItem,
)
from chatkit.widgets import Card, Text, WidgetRoot
from flask import Flask

from chatkit_flask import ChatKit
from chatkit_flask.server.actions import ActionContext
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.server_support import sse_events
from tests.test_server_mode import (
    URL,
    answer,
    close_app,
    create_body,
    create_thread,
    item_list,
    message_body,
    post,
    server_config,
)

AGENTS_MODULE = "stop_midway_agents_for_test"

# Sites should build widgets from templates; plain classes keep these tests short.
pytestmark = pytest.mark.filterwarnings("ignore:Direct usage of named widget classes")


class Midway:
    """What the waiting tool or handler saw: it got as far as its wait, and was cancelled."""

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.cancelled = threading.Event()
        self.finished = False

    async def wait_for_ever(self) -> None:
        self.waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished = True


def card(text: str) -> Card:
    return Card(children=[Text(value=text)])


@pytest.fixture
def midway() -> Midway:
    return Midway()


@pytest.fixture
def site(fake: FakeResponses, store_url: str, midway: Midway) -> Iterator[Flask]:
    """A site whose tool and action show a finished widget, start a streamed one, then wait."""
    module = types.ModuleType(AGENTS_MODULE)

    @function_tool
    async def slow_search(ctx: RunContextWrapper[AgentContext[Any]]) -> str:
        """Search slowly, showing progress."""
        await ctx.context.stream(ProgressUpdateEvent(text="Searching..."))
        await ctx.context.stream_widget(card("Found one result"))

        async def states() -> AsyncIterator[WidgetRoot]:
            yield card("Still searching...")
            await midway.wait_for_ever()
            yield card("Done")

        await ctx.context.stream_widget(states())
        return "done"

    module.agent = Agent(  # type: ignore[attr-defined]
        name="Site", model="gpt-test", tools=[slow_search]
    )
    sys.modules[AGENTS_MODULE] = module
    app = Flask("stop_site")
    app.config.update(server_config(fake, store_url, CHATKIT_AGENT=f"{AGENTS_MODULE}:agent"))
    chatkit = ChatKit(app)

    @chatkit.action("slow_booking")
    async def slow_booking(ctx: ActionContext) -> AsyncIterator[ThreadStreamEvent]:
        def widget(text: str) -> WidgetItem:
            return WidgetItem(id=ctx.new_item_id("message"), thread_id=ctx.thread.id,
                              created_at=datetime.now(), widget=card(text))  # fmt: skip

        yield ThreadItemDoneEvent(item=widget("Request received"))
        yield ThreadItemAddedEvent(item=widget("Booking..."))
        await midway.wait_for_ever()
        yield ThreadItemDoneEvent(item=widget("Booked"))

    @chatkit.action("ask_model")
    async def ask_model(ctx: ActionContext) -> AsyncIterator[ThreadStreamEvent]:
        yield ThreadItemDoneEvent(item=WidgetItem(
            id=ctx.new_item_id("message"), thread_id=ctx.thread.id, created_at=datetime.now(),
            widget=card("Asking the assistant"),
        ))  # fmt: skip
        async for event in ctx.model_turn():
            yield event

    yield app
    close_app(app)
    del sys.modules[AGENTS_MODULE]


def open_stream(client: Any, body: dict[str, Any]) -> Any:
    """A stream the test reads part of (as the browser does before the visitor presses stop)."""
    response = client.post(URL, json=body, buffered=False)
    assert response.status_code == 200
    return response


def read_until(response: Any, midway: Midway, marker: bytes) -> list[bytes]:
    """Frames until the one holding ``marker`` (the half-made item), then the tool's wait."""
    frames: list[bytes] = []
    for frame in response.response:
        frames.append(frame)
        if marker in frame:
            break
    assert midway.waiting.wait(5), "the tool or handler never reached its wait"
    return frames


def widget_texts(items: list[dict[str, Any]]) -> list[str]:
    return [child["value"] for item in items if item["type"] == "widget"
            for child in item["widget"]["children"]]  # fmt: skip


def assert_usable(client: Any, thread_id: str, fake: FakeResponses) -> list[dict[str, Any]]:
    """The thread lists, and its next message is answered (the items before it included)."""
    items = item_list(client, thread_id)
    fake.enqueue("Here again.")
    response = post(client, message_body(thread_id, "still there?"))
    assert answer(sse_events(response.data)) == "Here again."
    sent = fake.requests[-1].json or {}
    kinds = [item.get("type") for item in sent.get("input", []) if isinstance(item, dict)]
    # A function call without its output would make the provider refuse the request.
    assert kinds.count("function_call") == kinds.count("function_call_output")
    return items


def test_stop_while_a_tool_waits(site: Flask, fake: FakeResponses, midway: Midway) -> None:
    client = site.test_client()
    fake.enqueue(Reply.call_tool("slow_search"))
    response = open_stream(client, create_body("find something"))
    frames = read_until(response, midway, b"Still searching")
    thread_id = sse_events(b"".join(frames))[0]["thread"]["id"]
    response.close()  # the stop button
    assert midway.cancelled.wait(5) and not midway.finished
    assert fake.count == 1  # the model was not asked to go on

    items = assert_usable(client, thread_id, fake)
    assert widget_texts(items) == ["Found one result"]  # the half-made one is not stored
    assert [item["type"] for item in items] == ["user_message", "widget"]


def test_stop_while_an_action_handler_waits(
    site: Flask, fake: FakeResponses, midway: Midway
) -> None:
    client = site.test_client()
    thread_id = create_thread(client, "book me in")
    body = {"type": "threads.custom_action",
            "params": {"thread_id": thread_id, "action": {"type": "slow_booking"}}}  # fmt: skip
    response = open_stream(client, body)
    read_until(response, midway, b"Booking...")
    response.close()
    assert midway.cancelled.wait(5) and not midway.finished

    items = assert_usable(client, thread_id, fake)
    assert widget_texts(items) == ["Request received"]
    assert [item["type"] for item in items] == ["user_message", "assistant_message", "widget"]


def test_stop_during_an_actions_model_turn_keeps_what_was_read(
    site: Flask, fake: FakeResponses
) -> None:
    client = site.test_client()
    thread_id = create_thread(client, "book me in")
    fake.enqueue(Reply.hang(after_tokens=2, text="Booking you in for ten"))
    body = {"type": "threads.custom_action",
            "params": {"thread_id": thread_id, "action": {"type": "ask_model"}}}  # fmt: skip
    response = open_stream(client, body)
    deltas = 0
    for frame in response.response:
        deltas += b'"assistant_message.content_part.text_delta"' in frame
        if deltas == 2:
            break
    response.close()
    assert fake.wait_for_abort(1, timeout=5)  # the model request was aborted

    items = assert_usable(client, thread_id, fake)
    assert [item["type"] for item in items] == [
        "user_message", "assistant_message", "widget", "assistant_message"
    ]
    partial = "".join(part["text"] for part in items[-1]["content"])
    assert partial and "Booking you in for ten".startswith(partial)


def test_stop_then_a_new_thread_works_at_once(
    site: Flask, fake: FakeResponses, midway: Midway
) -> None:
    """The stopped reply's slots are free: the same visitor starts another conversation."""
    client = site.test_client()
    fake.enqueue(Reply.call_tool("slow_search"))
    response = open_stream(client, create_body("find something"))
    read_until(response, midway, b"Still searching")
    response.close()
    fake.enqueue("Hello again.")
    assert answer(sse_events(post(client, create_body("new topic")).data)) == "Hello again."
