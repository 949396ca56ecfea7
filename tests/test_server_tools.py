"""Tools that talk to the thread, end to end: the fake model calls the site's tools through HTTP
(the Flask test client, driven as the widget does), on both thread stores.

The site is the code of docs/tools.md, run as written. What a site may rely on: a tool's widget
is streamed and stored (``items.list`` and a fresh app on the same store show it), a streamed
widget grows by deltas and its last state is stored, progress updates are streamed and never
stored, a hidden context item (text or JSON) reaches the model on later turns and never the
browser, a tool reads the visitor's ``RequestContext``, a button of a tool's widget reaches the
site's action handler, two visitors' tools stream into their own threads only, and a visitor
who leaves while a widget fills stops the tool and leaves no half widget behind.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit_flask.server.actions")

from agents import RunContextWrapper, function_tool
from flask import Flask, request

from chatkit_flask import ChatKit
from chatkit_flask.server.actions import ActionContext
from chatkit_flask.testing import ChatKitDriver, chatkit_test_config
from chatkit_flask.testing.driver import parse_sse, user_input
from chatkit_flask.testing.fake_responses import FakeResponses, Reply, Turn

# A stored widget is read back into the SDK's named widget classes, which it deprecates (the
# extension silences that at import; pytest restores warnings per test).
pytestmark = pytest.mark.filterwarnings("ignore:Direct usage of named widget classes")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "tools.md"
SITE_MODULE = "docs_tools_site"
SLOW_TOOL_STOPPED = threading.Event()


def doc_blocks() -> tuple[str, str]:
    """docs/tools.md's Python: the site's module (every block before "Testing a tool"), and
    that section's test."""
    site, _, testing = DOC.read_text().partition("## Testing a tool")
    blocks = [re.findall(r"```python\n(.*?)```", part, re.S) for part in (site, testing)]
    return "\n".join(blocks[0]), "\n".join(blocks[1])


@pytest.fixture(scope="module")
def site_module() -> Iterator[types.ModuleType]:
    """The doc's module, plus two test tools: one reports the whole RequestContext, one fills
    a widget slowly."""
    module = types.ModuleType(SITE_MODULE)
    sys.modules[SITE_MODULE] = module  # before exec: the tools' annotations resolve in it
    exec(compile(doc_blocks()[0], str(DOC), "exec"), module.__dict__)

    @function_tool
    async def whoami(ctx: RunContextWrapper[Any]) -> str:
        """Who is asking, as the tool sees it."""
        context = ctx.context.request_context
        return json.dumps({"owner": context.owner, "user_id": context.user_id,
                           "locale": context.locale})  # fmt: skip

    @function_tool
    async def slow_summary(ctx: RunContextWrapper[Any]) -> str:
        """A widget that takes 20 s to fill: the visitor leaves before it is done."""

        async def states() -> Any:
            try:
                for n in range(1, 101):
                    yield module.SUMMARY.build({"text": "word " * n, "streaming": True})
                    await asyncio.sleep(0.2)
            finally:
                SLOW_TOOL_STOPPED.set()

        await ctx.context.stream_widget(states())
        return "done"

    module.agent.tools.extend([whoami, slow_summary])
    yield module
    del sys.modules[SITE_MODULE]


class Sites:
    """Builds the booking site on one store; closes every app it built."""

    def __init__(self, model: FakeResponses, store_url: str) -> None:
        self.model = model
        self.store_url = store_url
        self.booked: list[dict[str, Any]] = []
        self.built: list[tuple[Flask, ChatKit]] = []

    def app(self) -> Flask:
        app = Flask("booking_site")
        app.config.update(
            chatkit_test_config(
                self.model,
                CHATKIT_AGENT=f"{SITE_MODULE}:agent",
                CHATKIT_STORE_URL=self.store_url,
                CHATKIT_MAX_STREAMS_PER_IP=10,
            )
        )
        chatkit = ChatKit(app)
        chatkit.user_loader(lambda: request.headers.get("X-User"))

        @chatkit.action("book_slot", sync=True)
        async def book_slot(ctx: ActionContext) -> Any:
            self.booked.append({"slot": ctx.payload["slot"], "user": ctx.context.user_id,
                                "sender": ctx.sender.id if ctx.sender else None})  # fmt: skip
            return ctx.sender  # unchanged: the booking is what this test checks

        self.built.append((app, chatkit))
        return app

    def close(self) -> None:
        for app, chatkit in self.built:
            chatkit.close(app)


@pytest.fixture
def sites(
    chatkit_model: FakeResponses, store_url: str, site_module: types.ModuleType
) -> Iterator[Sites]:
    made = Sites(chatkit_model, store_url)
    yield made
    made.close()


def alice(app: Flask) -> ChatKitDriver:
    headers = {"X-User": "alice", "Accept-Language": "fr-CH, en;q=0.5"}
    return ChatKitDriver(app.test_client(), headers=headers)


def texts(widget_item: dict[str, Any]) -> list[str]:
    """Every Text value of a widget, depth first."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "Text":
                found.append(node["value"])
            for child in node.get("children", []):
                walk(child)

    walk(widget_item["widget"])
    return found


def looks(widget_item: dict[str, Any]) -> tuple[Any, ...]:
    """What the visitor sees of a widget item: its id, texts and buttons (label, action type and
    payload). A stored widget is read back with the SDK's defaults filled in (an action's
    ``handler``, ``loadingBehavior``), so a reloaded item is compared by this, not as JSON."""
    buttons: list[tuple[Any, ...]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "Button":
                action = node.get("onClickAction") or {}
                buttons.append((node.get("label"), action.get("type"), action.get("payload")))
            for child in node.get("children", []):
                walk(child)

    walk(widget_item["widget"])
    return widget_item["id"], texts(widget_item), buttons


def tool_outputs(model: FakeResponses) -> list[str]:
    return [
        item["output"]
        for recorded in model.requests
        for item in (recorded.json or {}).get("input", [])
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    ]


# --------------------------------------------------------------------- widgets
def test_a_tools_widget_is_streamed_after_its_progress_and_stored(
    sites: Sites, chatkit_model: FakeResponses
) -> None:
    chatkit_model.enqueue(Reply.call_tool("show_slots", {"day": "Monday"}), "Pick one.")
    chat = alice(sites.app())
    reply = chat.send("When can I come?")
    assert reply.progress == ["Looking up Monday..."]
    (card,) = reply.widgets
    assert texts(card) == ["Free on Monday"]
    assert reply.text == "Pick one."
    kinds = reply.types
    assert kinds.index("progress_update") < kinds.index("thread.item.done", 2)  # before the card
    assert "The visitor sees the free slots of Monday" in tool_outputs(chatkit_model)[-1]
    shown = chat.items()
    assert [item["type"] for item in shown] == ["user_message", "widget", "assistant_message"]
    assert looks(shown[1]) == looks(card)  # progress updates are not items
    assert looks(card)[2] == [("10:00", "book_slot", {"slot": "10:00"}),
                              ("11:30", "book_slot", {"slot": "11:30"})]  # fmt: skip

    # A reload: another app (another worker) on the same store, the same signed-in visitor.
    reload = alice(sites.app())
    assert reload.items(thread_id=reply.thread_id) == shown
    assert looks(reload.thread(reply.thread_id)["items"]["data"][1]) == looks(card)


def test_a_button_of_a_tools_widget_reaches_the_sites_action_handler(
    sites: Sites, chatkit_model: FakeResponses
) -> None:
    chatkit_model.enqueue(Reply.call_tool("show_slots", {"day": "Friday"}), "Pick one.")
    chat = alice(sites.app())
    (card,) = chat.send("Friday?").widgets
    buttons = card["widget"]["children"][1]["children"]
    assert [button["label"] for button in buttons] == ["10:00", "11:30"]
    action = buttons[1]["onClickAction"]
    chat.sync_action(action["type"], action["payload"], item_id=card["id"])
    assert sites.booked == [{"slot": "11:30", "user": "alice", "sender": card["id"]}]


def test_a_streamed_widget_grows_by_deltas_and_its_last_state_is_stored(
    sites: Sites, chatkit_model: FakeResponses
) -> None:
    chatkit_model.enqueue(Reply.call_tool("write_summary", {"booking": "Monday 10:00"}), "Done.")
    chat = alice(sites.app())
    reply = chat.send("Book Monday 10:00")
    (added,) = [e["item"] for e in reply.of("thread.item.added") if e["item"]["type"] == "widget"]
    assert texts(added) == ["Booked:"]
    deltas = [e["update"] for e in reply.of("thread.item.updated") if e["item_id"] == added["id"]]
    assert [d["delta"] for d in deltas if d["type"] == "widget.streaming_text.value_delta"] == [
        " Monday", " 10:00.", " See", " you", " soon!"
    ]
    (final,) = reply.widgets
    assert final["id"] == added["id"] and final["copy_text"] == "Booked: Monday 10:00."
    assert texts(final) == ["Booked: Monday 10:00. See you soon!"]
    assert looks(chat.items()[1]) == looks(final)


# ----------------------------------------------------------- hidden context
def test_a_hidden_note_reaches_the_model_on_later_turns_and_never_the_browser(
    sites: Sites, chatkit_model: FakeResponses
) -> None:
    chatkit_model.enqueue(Reply.call_tool("remember_choice", {"slot": "10:00"}), "Noted.")
    chat = alice(sites.app())
    reply = chat.send("I'll take 10:00")
    assert "chosen_slot" not in json.dumps(reply)
    assert [item["type"] for item in chat.items()] == ["user_message", "assistant_message"]
    assert "chosen_slot" not in json.dumps(chat.thread())

    for turn in ("And a window seat?", "Thanks"):  # every later turn, not just the next one
        assert chat.send(turn).text == f"You said: {turn}"
        sent = json.dumps(chatkit_model.requests[-1].json["input"])
        assert '\\"chosen_slot\\":\\"10:00\\"' in sent and "not shown to the user" in sent


# ---------------------------------------------------------- request context
def test_a_tool_reads_who_asks(sites: Sites, chatkit_model: FakeResponses) -> None:
    app = sites.app()
    chatkit_model.enqueue(Reply.call_tool("whoami"), "Hi.", Reply.call_tool("whoami"), "Hi.")
    alice(app).send("who am I?")
    ChatKitDriver(app.test_client()).send("and me?")  # anonymous, no Accept-Language
    signed_in, anonymous = (json.loads(output) for output in tool_outputs(chatkit_model)[-2:])
    assert signed_in["user_id"] == "alice" and signed_in["locale"] == "fr-CH"
    assert signed_in["owner"].startswith("user:") and "alice" not in signed_in["owner"]
    assert anonymous["user_id"] is None and anonymous["locale"] is None
    assert anonymous["owner"].startswith("visitor:")

    chatkit_model.enqueue(Reply.call_tool("my_bookings"), "None yet.")
    alice(app).send("my bookings?")
    assert tool_outputs(chatkit_model)[-1] == (
        "User alice has no bookings yet (answer in the language fr-CH)."
    )


def test_two_visitors_tools_stream_into_their_own_threads(
    sites: Sites, chatkit_model: FakeResponses
) -> None:
    app = sites.app()
    chatkit_model.token_delay = 0.05  # both answers under way at once
    # A Turn, not two queued replies: each visitor's step is read from its own request, so one
    # visitor's second request can never take the other's tool call.
    chatkit_model.set_default(
        Turn.of(("write_summary", {"booking": "a table"}), reply="Done and done and done.")
    )
    visitors = [ChatKitDriver(app.test_client(), headers={"X-User": name})
                for name in ("ann", "bob")]  # fmt: skip
    replies: dict[int, Any] = {}
    runs = [threading.Thread(target=lambda i=i: replies.__setitem__(i, visitors[i].send("go")))
            for i in range(2)]  # fmt: skip
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=60)
    for visitor, reply in zip(visitors, (replies[0], replies[1]), strict=True):
        (widget,) = reply.widgets
        assert widget["thread_id"] == reply.thread_id and reply.text == "Done and done and done."
        widget_ids = {e.get("item_id") for e in reply.of("thread.item.updated")} - {None}
        mine = {item["id"] for item in visitor.items()}
        assert widget_ids <= mine, "a stream carried another visitor's widget updates"


def test_a_visitor_who_leaves_mid_widget_stops_the_tool_and_the_thread_stays_whole(
    sites: Sites, chatkit_model: FakeResponses, caplog: pytest.LogCaptureFixture
) -> None:
    chatkit_model.enqueue(Reply.call_tool("slow_summary"))
    chat = alice(sites.app())
    SLOW_TOOL_STOPPED.clear()
    body = {"type": "threads.create", "params": {"input": user_input("summarise")}}
    response = chat.client.post(chat.url, json=body, headers=chat.headers, buffered=False)
    frames = iter(response.response)
    seen = b""
    while b"widget.streaming_text.value_delta" not in seen:  # the widget is on screen, growing
        seen += next(frames)
    response.close()  # what the WSGI server does when the browser goes away
    assert SLOW_TOOL_STOPPED.wait(5), "the tool kept running after the visitor left"
    thread_id = parse_sse(seen)[0]["thread"]["id"]

    deadline = time.monotonic() + 5
    while "outcome=cancelled" not in caplog.text:  # the stream's last writes, off the request
        assert time.monotonic() < deadline, "the stream was never logged as cancelled"
        time.sleep(0.05)
    # No half widget: what a reload shows is whole (a widget is kept only once finished).
    assert [item["type"] for item in chat.items(thread_id=thread_id)] == ["user_message"]
    assert chat.send("still there?", thread_id=thread_id).text == "You said: still there?"
    assert [item["type"] for item in chat.items()] == ["user_message", "user_message",
                                                       "assistant_message"]  # fmt: skip


# ------------------------------------------------------------------- the doc
def test_the_docs_testing_example_passes(sites: Sites, chatkit_model: FakeResponses) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(doc_blocks()[1], str(DOC), "exec"), namespace)
    namespace["test_the_slots_are_shown"](sites.app(), chatkit_model)

