"""The demo's card (``CHATKIT_DEMO`` in server mode, no ``CHATKIT_AGENT``), through HTTP on both
stores with the fake model calling the tool: the card is streamed and stored, a button's action
answers through the ``@chatkit.action`` registry (card updated, a short answer, a note for the
model's next turn), stale or made-up clicks are refused in words, and only the demo's plain
agent has the tool (a site's own agent, a service without the demo page and a host app never
do).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit_flask.server.demo_site")

from agents import Agent
from flask import Flask

from chatkit_flask import ChatKit
from chatkit_flask.server.demo_site import CHOOSE_ACTION
from chatkit_flask.service import create_app
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.server_support import sse_events
from tests.test_server_mode import (
    answer,
    assert_json_error,
    close_app,
    create_body,
    item_list,
    message_body,
    post,
    server_config,
)

# The SDK warns when it parses a stored widget into its own (deprecated) classes.
pytestmark = pytest.mark.filterwarnings("ignore:Direct usage of named widget classes")

CARD = {"question": "Which fruit?", "choices": ["Apple", "Banana", "Cherry"]}
SITE_AGENT = Agent(name="Site", instructions="Answer briefly.", model="gpt-test")


@pytest.fixture
def make_service(fake: FakeResponses, store_url: str) -> Iterator[Any]:
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        settings = {"CHATKIT_DEMO": True, "CHATKIT_METRICS_ENABLED": False, **overrides}
        config = server_config(fake, store_url, **settings)
        app = create_app(config, environ={})
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_app(app)


def action_body(thread_id: str, item_id: str, choice: Any) -> dict[str, Any]:
    action = {"type": CHOOSE_ACTION, "payload": {"choice": choice}}
    return {"type": "threads.custom_action",
            "params": {"thread_id": thread_id, "item_id": item_id, "action": action}}  # fmt: skip


def buttons(widget: dict[str, Any]) -> list[str]:
    [row] = [child for child in widget["children"] if child["type"] == "Row"]
    return [button["label"] for button in row["children"]]


def show_card(client: Any, fake: FakeResponses) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """A new thread whose answer is the card: (thread id, widget item, events)."""
    fake.enqueue(Reply.call_tool("offer_choices", CARD), "Pick one above.")
    events = sse_events(post(client, create_body("let me choose a fruit")).data)
    thread_id = events[0]["thread"]["id"]
    [card] = [e["item"] for e in events
              if e["type"] == "thread.item.done" and e["item"]["type"] == "widget"]  # fmt: skip
    return thread_id, card, events


def test_the_card_is_shown_and_its_button_answers(make_service: Any, fake: FakeResponses) -> None:
    client = make_service().test_client()
    thread_id, card, events = show_card(client, fake)
    assert card["widget"]["children"][0]["value"] == "Which fruit?"
    assert buttons(card["widget"]) == ["Apple", "Banana", "Cherry"]
    assert answer(events) == "Pick one above."
    tools = [tool["name"] for tool in fake.requests[0].json["tools"]]
    assert tools == ["offer_choices", "get_page_info"]  # the card, and the demo's client tool
    assert fake.count == 2  # the tool call, then the text after it

    clicked = post(client, action_body(thread_id, card["id"], "Banana"))

    assert clicked.status_code == 200
    kinds = [(e["type"], e["item"]["type"]) for e in sse_events(clicked.data) if "item" in e]
    assert kinds == [("thread.item.replaced", "widget"), ("thread.item.done", "assistant_message")]
    replaced, said = (e["item"] for e in sse_events(clicked.data) if "item" in e)
    assert replaced["id"] == card["id"]
    assert replaced["widget"]["children"][1]["value"] == "You picked Banana"
    assert said["content"][0]["text"] == "You picked Banana."
    assert fake.count == 2  # the handler answers without the model
    # Stored: the card shows the pick after a reload, and the answer follows it.
    stored = {item["id"]: item for item in item_list(client, thread_id)}
    assert stored[card["id"]]["widget"] == replaced["widget"]
    assert said["id"] in stored

    # The next turn tells the model what was picked (a hidden note, never shown).
    post(client, message_body(thread_id, "what did I pick?"))
    sent = json.dumps(fake.requests[-1].json["input"])
    assert "<DEMO_CHOICE>" in sent and "Banana" in sent


def test_stale_and_made_up_clicks_are_refused_in_words(
    make_service: Any, fake: FakeResponses
) -> None:
    client = make_service().test_client()
    thread_id, card, _ = show_card(client, fake)

    made_up = sse_events(post(client, action_body(thread_id, card["id"], "Durian")).data)
    assert [e for e in made_up if e["type"] == "error"] == [
        {"type": "error", "code": "custom", "allow_retry": False,
         "message": "That is not one of the card's choices."}
    ]  # fmt: skip
    assert not [e for e in made_up if e["type"].startswith("thread.item")]

    post(client, action_body(thread_id, card["id"], "Apple"))
    again = sse_events(post(client, action_body(thread_id, card["id"], "Cherry")).data)
    [error] = [e for e in again if e["type"] == "error"]
    assert error["message"] == "This card has already been answered."
    texts = [i["content"][0]["text"] for i in item_list(client, thread_id)
             if i["type"] == "assistant_message"]  # fmt: skip
    assert texts == ["Pick one above.", "You picked Apple."]

    # Another visitor cannot click it: 404 before the handler runs.
    stranger = make_service().test_client()
    refused = post(stranger, action_body(thread_id, card["id"], "Cherry"))
    assert refused.status_code == 404


def test_only_the_demo_agent_has_the_card(
    make_service: Any, fake: FakeResponses, tmp_path: Path
) -> None:
    """A service without the demo page, the demo with a site's own agent, or a host app that
    sets CHATKIT_DEMO (the page is the service's): no tool, and the card's action is a name
    nobody handles."""
    host = Flask("host_site")
    host.config.update(server_config(fake, f"sqlite:///{tmp_path}/host.db", CHATKIT_DEMO=True))
    ChatKit(host)
    for app in (
        make_service(CHATKIT_DEMO=False),
        make_service(CHATKIT_AGENT="tests.test_demo_site:SITE_AGENT"),
        host,
    ):
        fake.clear()
        client = app.test_client()
        events = sse_events(post(client, create_body("hello")).data)
        assert "offer_choices" not in json.dumps(fake.requests[0].json.get("tools", []))
        thread_id = events[0]["thread"]["id"]
        refused = post(client, action_body(thread_id, "msg_1", "Apple"))
        assert_json_error(refused, 400, "unsupported_action")
    close_app(host)
