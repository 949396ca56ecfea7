"""Client tools in server mode: the agent calls a tool that runs in the visitor's browser, the
stream ends waiting for it, and ``threads.add_client_tool_output`` brings the browser's result
back and continues the run. Through the Flask test client, on both thread stores, with the fake
Responses API calling the tool.

What a site may rely on: the call is stored as a pending ``client_tool_call`` item and the
stream ends; the output continues the run with the result sent to the model; only the pending
call of the caller's own thread takes an output (another owner's thread is 404; an output for a
thread that waits on nothing, or on a call already answered or left behind, is 409
``no_pending_tool_call``); an output longer than ``CHATKIT_CLIENT_TOOL_MAX_CHARS`` is 400
``tool_output_too_large``; an output counts against the message limits and token budgets like a
message and takes the thread's reply slot while it streams; a call left unanswered holds no
stream or thread slot.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

# chatkit_flask.server first: it silences the SDK's own deprecation warning at import.
pytest.importorskip("chatkit_flask.server.protocol")

from agents import Agent, RunContextWrapper, StopAtTools, function_tool
from chatkit.agents import AgentContext, ClientToolCall
from flask import Flask

from chatkit_flask import ChatKit
from chatkit_flask.settings import ConfigError, Settings
from chatkit_flask.testing import ChatKitDriver, ChatKitHTTPError
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.conftest import TEST_SECRET_KEY
from tests.server_support import sse_events
from tests.test_server_mode import (
    answer,
    assert_json_error,
    assert_refused_in_stream,
    assert_stream_headers,
    close_app,
    create_body,
    item_list,
    message_body,
    post,
    server_config,
)

AGENTS_MODULE = "client_tool_agents_for_test"


@pytest.fixture(scope="module", autouse=True)
def agents_module() -> Iterator[None]:
    """The site's agent, as OpenAI's samples write one: the tool hands the call to the browser
    and the run stops at it (``StopAtTools``)."""
    module = types.ModuleType(AGENTS_MODULE)

    @function_tool
    async def get_page_info(ctx: RunContextWrapper[AgentContext[Any]], field: str) -> str:
        """Ask the visitor's browser about the page it shows."""
        ctx.context.client_tool_call = ClientToolCall(
            name="get_page_info", arguments={"field": field}
        )
        return "asked the browser"

    module.agent = Agent(  # type: ignore[attr-defined]
        name="Site",
        model="gpt-test",
        tools=[get_page_info],
        tool_use_behavior=StopAtTools(stop_at_tool_names=["get_page_info"]),
    )
    sys.modules[AGENTS_MODULE] = module
    yield
    del sys.modules[AGENTS_MODULE]


def make_site(fake: FakeResponses, store_url: str, **config: Any) -> Flask:
    app = Flask("client_tool_site")
    app.config.update(server_config(fake, store_url, CHATKIT_AGENT=f"{AGENTS_MODULE}:agent",
                                    **config))  # fmt: skip
    ChatKit(app)
    return app


@pytest.fixture
def site(fake: FakeResponses, store_url: str) -> Iterator[Flask]:
    app = make_site(fake, store_url)
    yield app
    close_app(app)


def ask_the_browser(client: Any, fake: FakeResponses, reply: Reply | None = None) -> tuple[
    str, dict[str, Any]
]:
    """A new thread whose answer is a client tool call: (thread id, the pending call item)."""
    fake.enqueue(reply or Reply.call_tool("get_page_info", {"field": "title"}))
    response = post(client, create_body("what page am I on?"))
    assert_stream_headers(response)
    events = sse_events(response.data)
    thread_id = events[0]["thread"]["id"]
    last = events[-1]
    assert last["type"] == "thread.item.done" and last["item"]["type"] == "client_tool_call", last
    return thread_id, last["item"]


def output_body(thread_id: str, result: Any) -> dict[str, Any]:
    return {"type": "threads.add_client_tool_output",
            "params": {"thread_id": thread_id, "result": result}}  # fmt: skip


def tool_calls(client: Any, thread_id: str) -> list[dict[str, Any]]:
    return [item for item in item_list(client, thread_id) if item["type"] == "client_tool_call"]


def outputs_sent(fake: FakeResponses) -> list[str]:
    """The function call outputs the last model request carried."""
    request = fake.requests[-1].json or {}
    return [item["output"] for item in request.get("input", [])
            if isinstance(item, dict) and item.get("type") == "function_call_output"]  # fmt: skip


def test_the_browsers_output_continues_the_run(site: Flask, fake: FakeResponses) -> None:
    client = site.test_client()
    thread_id, call = ask_the_browser(client, fake)
    assert call["name"] == "get_page_info" and call["arguments"] == {"field": "title"}
    assert call["status"] == "pending" and fake.count == 1
    assert tool_calls(client, thread_id)[0]["status"] == "pending"

    fake.enqueue("You are on the Demo page.")
    response = post(client, output_body(thread_id, {"title": "Demo"}))
    assert_stream_headers(response)
    assert answer(sse_events(response.data)) == "You are on the Demo page."
    assert fake.count == 2
    assert [json.loads(output) for output in outputs_sent(fake)] == [{"title": "Demo"}]
    (stored,) = tool_calls(client, thread_id)
    assert stored["status"] == "completed" and stored["output"] == {"title": "Demo"}
    assert item_list(client, thread_id)[-1]["type"] == "assistant_message"


def test_a_site_tests_its_client_tool_with_the_conversation_driver(
    site: Flask, fake: FakeResponses
) -> None:
    """What a site's own test writes: ChatKitDriver sends the output the widget would."""
    chat, stranger = ChatKitDriver(site.test_client()), ChatKitDriver(site.test_client())
    fake.enqueue(Reply.call_tool("get_page_info", {"field": "title"}), "On the Demo page.")
    asked = chat.send("what page am I on?")
    assert asked.client_tool_call is not None
    assert asked.client_tool_call["arguments"] == {"field": "title"}
    assert chat.client_tool_output({"title": "Demo"}).text == "On the Demo page."
    with pytest.raises(ChatKitHTTPError) as stale:
        chat.client_tool_output({"title": "Demo"})
    assert (stale.value.status, stale.value.code) == (409, "no_pending_tool_call")
    with pytest.raises(ChatKitHTTPError) as foreign:
        stranger.client_tool_output({"title": "Demo"}, thread_id=asked.thread_id)
    assert (foreign.value.status, foreign.value.code) == (404, "not_found")


def test_another_owners_thread_is_404_and_the_call_stays_pending(
    site: Flask, fake: FakeResponses
) -> None:
    owner = site.test_client()
    thread_id, _ = ask_the_browser(owner, fake)
    stranger = site.test_client()
    post(stranger, create_body("my own thread"))
    count = fake.count
    assert_json_error(post(stranger, output_body(thread_id, {"title": "x"})), 404, "not_found")
    assert fake.count == count
    assert tool_calls(owner, thread_id)[0]["status"] == "pending"
    fake.enqueue("Done.")
    assert answer(sse_events(post(owner, output_body(thread_id, "Demo")).data)) == "Done."


def test_an_output_nobody_waits_for_is_409(site: Flask, fake: FakeResponses) -> None:
    client = site.test_client()
    response = post(client, create_body("hello"))  # an ordinary answer: no call pending
    plain_thread = sse_events(response.data)[0]["thread"]["id"]
    assert_json_error(post(client, output_body(plain_thread, 1)), 409, "no_pending_tool_call")

    thread_id, _ = ask_the_browser(client, fake)
    fake.enqueue("Done.")
    assert answer(sse_events(post(client, output_body(thread_id, "Demo")).data)) == "Done."
    count = fake.count
    # Answered already (a second tab, a double click): refused, nothing changes.
    again = post(client, output_body(thread_id, "Other"))
    body = assert_json_error(again, 409, "no_pending_tool_call")
    assert "not waiting" in body["message"]
    assert fake.count == count
    assert tool_calls(client, thread_id)[0]["output"] == "Demo"


def test_an_unanswered_call_holds_no_slot_and_a_later_message_leaves_it_behind(
    fake: FakeResponses, store_url: str
) -> None:
    app = make_site(fake, store_url, CHATKIT_MAX_STREAMS_PER_USER=1)
    try:
        client = app.test_client()
        thread_id, _ = ask_the_browser(client, fake)
        # The visitor writes instead of the browser answering: the thread and the visitor's
        # only stream slot are free, and the model does not see the unanswered call.
        fake.enqueue("Sure.")
        response = post(client, message_body(thread_id, "never mind"))
        assert answer(sse_events(response.data)) == "Sure."
        assert outputs_sent(fake) == []
        stale = post(client, output_body(thread_id, {"title": "late"}))
        assert_json_error(stale, 409, "no_pending_tool_call")
        assert item_list(client, thread_id)[-1]["type"] == "assistant_message"
    finally:
        close_app(app)


def test_the_continuation_takes_the_threads_reply_slot(site: Flask, fake: FakeResponses) -> None:
    client = site.test_client()
    thread_id, _ = ask_the_browser(client, fake)
    slow = " ".join(f"word{i}" for i in range(12))
    fake.enqueue(Reply(text=slow, token_delay=0.15))
    results: dict[str, Any] = {}
    continuing = threading.Thread(
        target=lambda: results.update(reply=post(client, output_body(thread_id, "Demo")))
    )
    continuing.start()
    try:
        fake.wait_for(2)  # the continuation is streaming
        busy = post(client, message_body(thread_id, "hurry up"))
        assert_refused_in_stream(busy, "A reply is still being written in this conversation")
        assert continuing.is_alive()
    finally:
        continuing.join(20)
    assert answer(sse_events(results["reply"].data)) == slow
    assert fake.count == 2


def test_an_oversized_output_is_400_and_the_call_stays_pending(
    fake: FakeResponses, store_url: str
) -> None:
    app = make_site(fake, store_url, CHATKIT_CLIENT_TOOL_MAX_CHARS=100,
                    CHATKIT_RATELIMIT_PER_USER="2 per minute")  # fmt: skip
    try:
        client = app.test_client()
        thread_id, _ = ask_the_browser(client, fake)  # message 1 of 2
        count = fake.count
        big = "é" * 99  # 101 characters of JSON with its quotes
        body = assert_json_error(post(client, output_body(thread_id, big)), 400,
                                 "tool_output_too_large")  # fmt: skip
        assert "100 characters" in body["message"]
        assert fake.count == count and tool_calls(client, thread_id)[0]["status"] == "pending"
        # Refused, it was not a message: the one that fits is message 2 and is answered.
        fake.enqueue("Fits.")
        fits = post(client, output_body(thread_id, "é" * 98))
        assert answer(sse_events(fits.data)) == "Fits."
    finally:
        close_app(app)


def test_an_output_counts_against_the_message_limit(fake: FakeResponses, store_url: str) -> None:
    app = make_site(fake, store_url, CHATKIT_RATELIMIT_PER_USER="2 per minute")
    try:
        client = app.test_client()
        first, _ = ask_the_browser(client, fake)  # 1 of 2
        fake.enqueue(Reply.call_tool("get_page_info", {"field": "url"}))
        response = post(client, output_body(first, {"title": "Demo"}))  # 2: asks again
        assert sse_events(response.data)[-1]["item"]["type"] == "client_tool_call"
        count = fake.count
        refused = post(client, output_body(first, {"url": "/demo"}))
        assert_refused_in_stream(refused, "too many messages")
        assert fake.count == count
        assert tool_calls(client, first)[-1]["status"] == "pending"
    finally:
        close_app(app)


def test_an_output_is_charged_to_the_token_budget_which_then_refuses_it(
    fake: FakeResponses, store_url: str
) -> None:
    app = make_site(fake, store_url, CHATKIT_TOKENS_PER_USER="1000 per day")
    try:
        client = app.test_client()
        thread_id, _ = ask_the_browser(client, fake)
        # A reply's worst case is reserved until its stream ends, then settled off the event
        # loop: wait for it, else the output would find the reservation still in the budget.
        time.sleep(0.3)
        # The continuation costs more than the whole budget: charged once its stream ends.
        fake.enqueue(Reply(text="An expensive answer.", input_tokens=5000))
        response = post(client, output_body(thread_id, {"title": "Demo"}))
        assert answer(sse_events(response.data)) == "An expensive answer."
        time.sleep(0.3)  # the charge is made off the event loop, once the stream ends
        refused = post(client, message_body(thread_id, "and now?"))
        assert "share of the assistant" in assert_refused_in_stream(refused, "")["message"]

        # Another visitor, whose call's own turn spent the budget: the output is refused
        # before anything is stored and the call stays pending.
        visitor = app.test_client()
        costly = dataclasses.replace(
            Reply.call_tool("get_page_info", {"field": "title"}), input_tokens=5000
        )
        pending_thread, _ = ask_the_browser(visitor, fake, costly)
        time.sleep(0.3)
        count = fake.count
        refused = post(visitor, output_body(pending_thread, {"title": "Demo"}))
        assert "share of the assistant" in assert_refused_in_stream(refused, "")["message"]
        assert fake.count == count
        assert tool_calls(visitor, pending_thread)[0]["status"] == "pending"
    finally:
        close_app(app)


def test_the_cap_is_checked_at_start_up() -> None:
    base = {"OPENAI_API_KEY": "k", "SECRET_KEY": TEST_SECRET_KEY, "CHATKIT_BACKEND": "server"}
    assert Settings.from_mapping(base).client_tool_max_chars == 8000
    with pytest.raises(ConfigError) as refused:
        Settings.from_mapping({**base, "CHATKIT_CLIENT_TOOL_MAX_CHARS": 0})
    assert refused.value.key == "CHATKIT_CLIENT_TOOL_MAX_CHARS"
    assert Settings.from_mapping({**base, "CHATKIT_CLIENT_TOOL_MAX_CHARS": 100_000})
