"""The site's own code run by server mode (agent tools, a per-request agent factory), and what a
site's test suite gets: the model through the fake Responses API on a loopback socket, threads in
a temporary SQLite file, apps it can close.

What a site relies on: each tool call and factory call runs inside a fresh app context of the
site's app, torn down after the call (its teardown handlers run), with no request; site code sees
the id its user loader returned; a failing tool is logged by name and exception type, never its
arguments; nothing of the view's Flask context reaches the event loop; ``chatkit.close()`` leaves
no thread behind; a test client that reads a stream to its end frees the stream slot.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("chatkit")

from agents import Agent, RunContextWrapper, function_tool, handoff
from flask import Flask, current_app, g, has_request_context

from chatkit_flask import ChatKit
from chatkit_flask.server.bridge import AsyncBridge
from chatkit_flask.testing import TEST_WORKFLOW_ID, FakeChatKit, chatkit_test_config
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.server_support import sse_events, user_input

URL = "/api/chatkit"
AGENTS_MODULE = "site_code_agents_for_test"


def new_thread(text: str = "hello") -> dict[str, Any]:
    return {"type": "threads.create", "params": {"input": user_input(text)}}


def tool_outputs(fake: FakeResponses) -> list[str]:
    """What the tools returned to the model, in the order the model saw them."""
    return [
        item["output"]
        for request in fake.requests
        for item in (request.json or {}).get("input", [])
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    ]


class Site:
    """What the site's tools and teardown handlers observed."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.teardowns: list[int] = []
        self.order: list[str] = []  # what happened, in order (slow_lookup and teardowns)
        self.started = threading.Event()

    def observe(self, user_id: str | None) -> str:
        self.seen.append(
            {
                "app": current_app.name,
                "request": has_request_context(),
                "user_id": user_id,
                "fresh_g": "marker" not in g,
                "context": id(g._get_current_object()),
            }
        )
        g.marker = True  # a context reused by the next call would still have it
        return f"user={user_id}"


@pytest.fixture
def site() -> Iterator[Site]:
    """A module the app names in CHATKIT_AGENT: a sync tool, an async tool, a failing tool and
    a per-request factory."""
    observed = Site()
    module = types.ModuleType(AGENTS_MODULE)

    @function_tool
    def whoami(ctx: RunContextWrapper[Any]) -> str:
        """Who is asking (sync: the Agents SDK runs it in a worker thread)."""
        return observed.observe(ctx.context.request_context.user_id)

    @function_tool
    async def whoami_async(ctx: RunContextWrapper[Any]) -> str:
        """Who is asking (async: runs on the event loop)."""
        return observed.observe(ctx.context.request_context.user_id)

    @function_tool
    def lookup(query: str) -> str:
        """Always fails, quoting its argument."""
        raise ValueError(f"cannot look up {query}")

    @function_tool
    def slow_lookup() -> str:
        """Takes half a second in its worker thread."""
        observed.order.append("tool started")
        observed.started.set()
        time.sleep(0.5)
        observed.order.append("tool ended")
        return "slow"

    tools = [whoami, whoami_async, lookup, slow_lookup]
    module.agent = Agent(name="Site", model="gpt-test", tools=tools)  # type: ignore[attr-defined]

    def per_request(context: Any) -> Agent:
        observed.observe(context.user_id)
        return Agent(name="Site", model="gpt-test", tools=tools)

    module.per_request = per_request  # type: ignore[attr-defined]
    billing = Agent(name="Billing", model="gpt-test", tools=[whoami])
    module.front = Agent(name="Front", model="gpt-test", handoffs=[billing])  # type: ignore[attr-defined]
    module.front_via_handoff = Agent(  # type: ignore[attr-defined]
        name="Front",
        model="gpt-test",
        handoffs=[handoff(billing, on_handoff=lambda ctx: observed.observe("handing off"))],
    )
    sys.modules[AGENTS_MODULE] = module
    yield observed
    del sys.modules[AGENTS_MODULE]


@pytest.fixture
def make_site_app(
    chatkit_model: FakeResponses, site: Site
) -> Iterator[Callable[..., tuple[Flask, ChatKit]]]:
    made: list[tuple[Flask, ChatKit]] = []

    def make(agent: str = "agent", user: Any = None, **overrides: Any) -> tuple[Flask, ChatKit]:
        app = Flask("the_site")
        app.config.update(
            chatkit_test_config(
                chatkit_model, CHATKIT_AGENT=f"{AGENTS_MODULE}:{agent}", **overrides
            )
        )
        @app.teardown_appcontext
        def teardown(exc: BaseException | None) -> None:
            site.teardowns.append(1)
            site.order.append("teardown")

        chatkit = ChatKit(app)
        chatkit.user_loader(lambda: user)
        made.append((app, chatkit))
        return app, chatkit

    yield make
    for app, chatkit in made:
        chatkit.close(app)


# ----------------------------------------------------------------- app context
@pytest.mark.parametrize("tool", ["whoami", "whoami_async"])
def test_each_tool_call_runs_in_a_fresh_app_context_that_is_torn_down(
    make_site_app: Callable[..., tuple[Flask, ChatKit]],
    chatkit_model: FakeResponses,
    site: Site,
    tool: str,
) -> None:
    app, _ = make_site_app(user=1)
    client = app.test_client()
    for _ in range(3):
        chatkit_model.enqueue(Reply.call_tool(tool), "Done.")
        response = client.post(URL, json=new_thread())
        assert [e["type"] for e in sse_events(response.data)][-1] == "thread.item.done"
    assert tool_outputs(chatkit_model) == ["user=1"] * 3
    assert [s["app"] for s in site.seen] == ["the_site"] * 3
    assert not any(s["request"] for s in site.seen)  # no stale request of the view
    assert all(s["fresh_g"] for s in site.seen)
    # Every context pushed for a call was popped: one teardown per tool call, one per request.
    assert len(site.teardowns) == 3 + 3


def test_a_visitor_leaving_mid_tool_is_not_torn_down_under_a_sync_tool(
    make_site_app: Callable[..., tuple[Flask, ChatKit]],
    chatkit_model: FakeResponses,
    site: Site,
) -> None:
    app, _ = make_site_app(user=1)
    chatkit_model.enqueue(Reply.call_tool("slow_lookup"), "Done.")
    response = app.test_client().post(URL, json=new_thread())
    assert site.started.wait(5)
    response.close()  # the visitor leaves while the tool's worker thread runs
    deadline = time.monotonic() + 5
    while site.order[-1] != "teardown" and time.monotonic() < deadline:
        time.sleep(0.02)
    during = site.order[site.order.index("tool started") :]
    # The thread's session is given back after the thread is done with it, not under it.
    assert during == ["tool started", "tool ended", "teardown"]
    assert chatkit_model.count == 1  # the model was not asked again


def test_the_agent_factory_runs_in_an_app_context_with_the_loaders_id(
    make_site_app: Callable[..., tuple[Flask, ChatKit]],
    chatkit_model: FakeResponses,
    site: Site,
) -> None:
    app, _ = make_site_app(agent="per_request", user=42)
    chatkit_model.enqueue(Reply.call_tool("whoami"), "Done.")
    app.test_client().post(URL, json=new_thread()).get_data()
    factory_call, tool_call = site.seen
    assert factory_call["app"] == tool_call["app"] == "the_site"
    assert factory_call["user_id"] == tool_call["user_id"] == "42"  # not "user_42"
    assert factory_call["context"] != tool_call["context"]  # one context per call
    assert tool_outputs(chatkit_model) == ["user=42"]


@pytest.mark.parametrize("agent", ["front", "front_via_handoff"])
def test_tools_of_an_agent_handed_off_to_run_in_an_app_context_too(
    make_site_app: Callable[..., tuple[Flask, ChatKit]],
    chatkit_model: FakeResponses,
    site: Site,
    agent: str,
) -> None:
    app, _ = make_site_app(agent=agent, user=5)
    chatkit_model.enqueue(Reply.call_tool("transfer_to_billing"), Reply.call_tool("whoami"), "Ok.")
    app.test_client().post(URL, json=new_thread()).get_data()
    assert tool_outputs(chatkit_model)[-1] == "user=5"
    assert all(s["app"] == "the_site" and s["fresh_g"] for s in site.seen)
    assert len(site.seen) == (2 if agent == "front_via_handoff" else 1)


def test_a_visitor_has_no_user_id(
    make_site_app: Callable[..., tuple[Flask, ChatKit]], chatkit_model: FakeResponses
) -> None:
    app, _ = make_site_app(user=None)
    chatkit_model.enqueue(Reply.call_tool("whoami"), "Done.")
    app.test_client().post(URL, json=new_thread()).get_data()
    assert tool_outputs(chatkit_model) == ["user=None"]


def test_a_failing_tool_is_logged_by_name_and_type_never_its_arguments(
    make_site_app: Callable[..., tuple[Flask, ChatKit]],
    chatkit_model: FakeResponses,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_site_app(user=1)
    chatkit_model.enqueue(Reply.call_tool("lookup", {"query": "private-words-9f3"}), "Sorry.")
    with caplog.at_level(logging.DEBUG):
        response = app.test_client().post(URL, json=new_thread())
        events = sse_events(response.data)
    assert events[-1]["type"] == "thread.item.done"  # the model got a text and answered
    lines = [r.getMessage() for r in caplog.records if "agent tool" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("chatkit_flask: agent tool lookup failed: ValueError [")
    assert "private-words-9f3" not in caplog.text


def test_the_event_loop_gets_none_of_the_callers_context_variables() -> None:
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker")
    bridge = AsyncBridge()
    try:
        marker.set("from the view")

        async def read() -> str | None:
            return marker.get(None)

        async def frames() -> Any:
            yield marker.get(None)

        assert bridge.run(read, 5) is None
        assert list(bridge.stream(frames)) == [None]
    finally:
        bridge.close()


# ------------------------------------------------------------------- closing
def loop_threads() -> list[threading.Thread]:
    """Threads server mode starts: the event loop and its worker threads."""
    return [
        t
        for t in threading.enumerate()
        if t.name == "chatkit-async" or t.name.startswith("asyncio_")
    ]


def test_twenty_apps_created_and_closed_leave_no_threads(
    make_site_app: Callable[..., tuple[Flask, ChatKit]], chatkit_model: FakeResponses
) -> None:
    before = set(threading.enumerate())
    for _ in range(20):
        app, chatkit = make_site_app(user=1)
        chatkit_model.enqueue(Reply.call_tool("whoami"), "Done.")
        app.test_client().post(URL, json=new_thread()).get_data()
        assert loop_threads()  # the message started the loop and a worker thread
        chatkit.close()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) - before == set()


def test_close_twice_is_harmless_and_a_closed_app_answers_again(
    make_site_app: Callable[..., tuple[Flask, ChatKit]], chatkit_model: FakeResponses
) -> None:
    before = set(threading.enumerate())
    app, chatkit = make_site_app(user=1)
    client = app.test_client()
    assert "You said: hello" in client.post(URL, json=new_thread()).get_data(as_text=True)
    assert set(loop_threads()) - before
    chatkit.close(app)
    chatkit.close(app)
    assert set(threading.enumerate()) - before == set()
    response = client.post(URL, json=new_thread("again"))
    assert sse_events(response.data)[-1]["type"] == "thread.item.done"
    assert chatkit_model.count == 2


# ------------------------------------------------------------ testing helpers
def test_test_config_for_server_mode_needs_no_redis_and_calls_only_the_fake(
    chatkit_model: FakeResponses,
) -> None:
    config = chatkit_test_config(chatkit_model)
    assert config["CHATKIT_BACKEND"] == "server"
    assert config["OPENAI_BASE_URL"] == chatkit_model.base_url
    assert config["CHATKIT_STORE_URL"].startswith("sqlite:///")
    assert config["RATELIMIT_ENABLED"] is False
    assert "CHATKIT_WORKFLOW_ID" not in config
    app = Flask("tested_site")
    app.config.update(config)
    chatkit = ChatKit(app)
    try:
        client = app.test_client()
        for _ in range(3):  # more than the 2 stream slots, and no limit refuses
            assert "You said: hi" in client.post(URL, json=new_thread("hi")).get_data(True)
        assert chatkit_model.count == 3
    finally:
        chatkit.close()


def test_test_config_for_hosted_mode_names_the_backend(chatkit_api: FakeChatKit) -> None:
    config = chatkit_test_config(chatkit_api)
    assert config["CHATKIT_BACKEND"] == "hosted"
    assert config["CHATKIT_API_BASE"] == chatkit_api.base_url
    assert config["CHATKIT_WORKFLOW_ID"] == TEST_WORKFLOW_ID


def test_a_stream_read_to_its_end_frees_its_slot_without_close(
    make_site_app: Callable[..., tuple[Flask, ChatKit]], chatkit_model: FakeResponses
) -> None:
    app, _ = make_site_app(user=1, RATELIMIT_ENABLED=True, CHATKIT_MAX_STREAMS_PER_USER=2)
    client = app.test_client()
    for n in range(4):  # each read to its end, none closed: what a site's test does
        response = client.post(URL, json=new_thread(f"message {n}"))
        assert sse_events(response.data)[-1]["type"] == "thread.item.done", response.data
