"""The demo's client tool (server/demo_client_tool.py): the standalone service's demo agent
offers ``get_page_info`` (beside the demo's card) and stops its run at it; a site's own agent,
the service without the demo, or a host app that sets ``CHATKIT_DEMO`` never gets it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit_flask.server.protocol")

from agents import Agent, StopAtTools
from flask import Flask

from chatkit_flask import ChatKit
from chatkit_flask.server.demo_client_tool import CLIENT_TOOL, with_client_tool
from chatkit_flask.service import create_app
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.conftest import TEST_API_KEY
from tests.server_support import sse_events
from tests.test_server_mode import close_app, create_body, post, server_config


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=TEST_API_KEY) as server:
        yield server


def offered_tools(fake: FakeResponses) -> list[str]:
    request = fake.requests[-1].json or {}
    return [tool.get("name") for tool in request.get("tools", [])]


def test_the_demo_agent_asks_the_browser(fake: FakeResponses, tmp_path: Path) -> None:
    fake.clear()
    app = create_app(server_config(fake, f"sqlite:///{tmp_path}/t.db", CHATKIT_DEMO=True),
                     environ={})  # fmt: skip
    try:
        fake.enqueue(Reply.call_tool(CLIENT_TOOL), "not asked: the run stops at the call")
        events = sse_events(post(app.test_client(), create_body("what time is it?")).data)
        assert CLIENT_TOOL in offered_tools(fake)
        last = events[-1]
        assert last["item"]["type"] == "client_tool_call" and last["item"]["name"] == CLIENT_TOOL
        assert fake.count == 1 and fake.pending == 1
    finally:
        close_app(app)


@pytest.mark.parametrize("overrides", [{"CHATKIT_DEMO": False}, {"CHATKIT_DEMO": True,
                                        "CHATKIT_AGENT": "tests.test_demo_client_tool:SITE"}])
def test_no_other_agent_gets_it(
    fake: FakeResponses, tmp_path: Path, overrides: dict[str, Any]
) -> None:
    fake.clear()
    app = create_app(server_config(fake, f"sqlite:///{tmp_path}/t.db", **overrides), environ={})
    try:
        post(app.test_client(), create_body("hello"))
        assert CLIENT_TOOL not in offered_tools(fake)
    finally:
        close_app(app)


def test_a_host_app_with_the_demo_setting_does_not_get_it(
    fake: FakeResponses, tmp_path: Path
) -> None:
    fake.clear()
    app = Flask("host")
    app.config.update(server_config(fake, f"sqlite:///{tmp_path}/t.db", CHATKIT_DEMO=True))
    ChatKit(app)
    try:
        post(app.test_client(), create_body("hello"))
        assert CLIENT_TOOL not in offered_tools(fake)
    finally:
        close_app(app)


SITE = Agent(name="Site", model="gpt-test", instructions="Be brief.")


def test_the_tool_keeps_the_tools_an_agent_already_stops_at() -> None:
    agent = Agent(name="A", tool_use_behavior=StopAtTools(stop_at_tool_names=["show_card"]))
    assert with_client_tool(agent).tool_use_behavior == {
        "stop_at_tool_names": ["show_card", CLIENT_TOOL]
    }
    assert with_client_tool(SITE).tool_use_behavior == {"stop_at_tool_names": [CLIENT_TOOL]}
    assert SITE.tools == [] and SITE.tool_use_behavior == "run_llm_again"  # left as it was
