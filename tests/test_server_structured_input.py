"""Structured input in server mode (``threads.add_structured_input``): the site's tool asks the
visitor a few questions (a ``StructuredInputItem``), the widget sends the answers back, the model
reads them and answers. Through the Flask test client on both stores, with the fake Responses API.

What a site may rely on: the answers are stored on the item and reach the model; another owner's
thread or item is a 404 and the model is not called; answers longer than a message may be are a
400 (``CHATKIT_MAX_INPUT_CHARS`` counts them) and leave the item pending; an item answered once
cannot be answered again; the answers count as a message against the message limits, the token
budget and the stream slots.
"""

from __future__ import annotations

import json
import sys
import time
import types
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

# chatkit_flask.server first: it silences the SDK's own deprecation warning at import.
pytest.importorskip("chatkit_flask.server.protocol")

from agents import Agent, RunContextWrapper, function_tool
from chatkit.types import (
    StructuredInputFreeform,
    StructuredInputItem,
    StructuredInputMultipleChoice,
    StructuredInputMultipleChoiceOption,
    ThreadItemDoneEvent,
)
from flask import Flask, request

from chatkit_flask import ChatKit
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.server_support import sse_events
from tests.test_server_mode import (
    URL,
    assert_json_error,
    assert_refused_in_stream,
    assert_stream_headers,
    close_app,
    create_body,
    item_list,
    post,
    server_config,
)

AGENTS_MODULE = "structured_input_agents_for_test"
QUESTIONS = "Please answer the questions above."


@pytest.fixture(scope="module", autouse=True)
def _agents() -> Iterator[None]:
    """The site's agent: one tool that asks the visitor for a priority and a note."""
    module = types.ModuleType(AGENTS_MODULE)

    @function_tool
    async def ask_ticket_details(ctx: RunContextWrapper[Any]) -> str:
        """Ask the visitor for the ticket's priority and a note."""
        agent_context = ctx.context
        item = StructuredInputItem(
            id=agent_context.generate_id("message"),
            thread_id=agent_context.thread.id,
            created_at=datetime.now(),
            inputs=[
                StructuredInputMultipleChoice(
                    id="priority",
                    question="What priority should I use?",
                    options=[StructuredInputMultipleChoiceOption(value=v)
                             for v in ("Low", "High")],
                ),
                StructuredInputFreeform(id="notes", question="Any extra context?"),
            ],
        )
        await agent_context.stream(ThreadItemDoneEvent(item=item))
        return "The questions are shown to the visitor."

    module.agent = Agent(  # type: ignore[attr-defined]
        name="Tickets", model="gpt-test", tools=[ask_ticket_details]
    )
    sys.modules[AGENTS_MODULE] = module
    yield
    del sys.modules[AGENTS_MODULE]


def ticket_site(fake: FakeResponses, store_url: str, **config: Any) -> Flask:
    app = Flask("ticket_site")
    app.config.update(
        server_config(fake, store_url, CHATKIT_AGENT=f"{AGENTS_MODULE}:agent", **config)
    )
    chatkit = ChatKit(app)

    @chatkit.user_loader
    def current_user() -> str | None:
        return request.headers.get("X-User")

    return app


@pytest.fixture
def site(fake: FakeResponses, store_url: str) -> Iterator[Flask]:
    app = ticket_site(
        fake, store_url, CHATKIT_RATELIMIT_PER_USER="4 per minute", CHATKIT_MAX_INPUT_CHARS=200
    )
    yield app
    close_app(app)


def ask(
    client: Any, fake: FakeResponses, answer: Reply | str = QUESTIONS, **kwargs: Any
) -> tuple[str, dict[str, Any]]:
    """A new thread whose answer is the questions: (thread id, the structured input item)."""
    fake.enqueue(Reply.call_tool("ask_ticket_details"), answer)
    response = post(client, create_body("please file a ticket"), **kwargs)
    assert_stream_headers(response)
    events = sse_events(response.data)
    thread_id = events[0]["thread"]["id"]
    (item,) = [
        e["item"] for e in events
        if e["type"] == "thread.item.done" and e["item"]["type"] == "structured_input"
    ]
    assert item["status"] == "pending"
    return thread_id, item


def answers_body(thread_id: str, item_id: str, answers: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "type": "threads.add_structured_input",
        "params": {
            "thread_id": thread_id,
            "item_id": item_id,
            "input": {"status": "answered",
                      "answers": {key: {"values": values} for key, values in answers.items()}},
        },
    }


def stored(client: Any, thread_id: str, item_id: str, **kwargs: Any) -> dict[str, Any]:
    """The item as ``items.list`` shows it to the visitor (``kwargs``: the request's)."""
    params = {"thread_id": thread_id, "order": "asc"}
    response = post(client, {"type": "items.list", "params": params}, **kwargs)
    assert response.status_code == 200, response.data
    (item,) = [i for i in response.get_json()["data"] if i["id"] == item_id]
    return item


def model_inputs(fake: FakeResponses) -> str:
    """Everything the last model request sent as input, as one string."""
    return str(fake.requests[-1].json["input"])


def test_the_answers_are_stored_and_the_model_reads_them(
    site: Flask, fake: FakeResponses, caplog: pytest.LogCaptureFixture
) -> None:
    client = site.test_client()
    thread_id, item = ask(client, fake)
    count = fake.count
    fake.enqueue("A high-priority ticket it is.")
    answers = {"priority": ["High"], "notes": ["the printer is on fire"],
               "not-a-question": ["ignored"]}
    response = post(client, answers_body(thread_id, item["id"], answers))
    assert_stream_headers(response)
    events = sse_events(response.data)
    assert events[-1]["item"]["type"] == "assistant_message"
    assert events[-1]["item"]["content"][0]["text"] == "A high-priority ticket it is."
    assert fake.count == count + 1
    sent = model_inputs(fake)
    assert "<StructuredInput>" in sent
    assert "What priority should I use?: High" in sent
    assert "Any extra context?: the printer is on fire" in sent
    assert "ignored" not in sent
    assert "not-a-question" not in caplog.text  # an unknown id is the caller's text: not logged
    answered = stored(client, thread_id, item["id"])
    assert answered["status"] == "answered"
    assert [q["answer"]["values"] for q in answered["inputs"]] == [
        ["High"], ["the printer is on fire"]
    ]


def test_an_item_answered_once_cannot_be_answered_again(site: Flask, fake: FakeResponses) -> None:
    client = site.test_client()
    thread_id, item = ask(client, fake)
    first = post(client, answers_body(thread_id, item["id"], {"priority": ["Low"]}))
    assert first.status_code == 200
    count = fake.count
    again = post(client, answers_body(thread_id, item["id"], {"priority": ["High"]}))
    assert_json_error(again, 400, "invalid_request")
    assert fake.count == count
    assert stored(client, thread_id, item["id"])["inputs"][0]["answer"]["values"] == ["Low"]
    # The visitor's own message is not a structured input item either.
    message = item_list(client, thread_id)[0]
    assert_json_error(post(client, answers_body(thread_id, message["id"], {})), 400,
                      "invalid_request")


def test_another_owners_thread_or_item_is_404_and_the_model_is_not_called(
    site: Flask, fake: FakeResponses
) -> None:
    alice, mallory = {"X-User": "alice"}, {"X-User": "mallory"}
    client = site.test_client()
    thread_id, item = ask(client, fake, headers=alice)
    own_thread, _ = ask(client, fake, headers=mallory)
    count = fake.count
    for target in (thread_id, own_thread):  # her thread; his own thread with her item
        response = post(
            client, answers_body(target, item["id"], {"priority": ["High"]}), headers=mallory
        )
        assert_json_error(response, 404, "not_found")
    assert fake.count == count
    assert stored(client, thread_id, item["id"], headers=alice)["status"] == "pending"


def test_answers_longer_than_a_message_are_400_and_leave_the_item_pending(
    site: Flask, fake: FakeResponses
) -> None:
    client = site.test_client()
    thread_id, item = ask(client, fake)
    count = fake.count
    # 200 characters in all: the question ids count, and the values as the model reads them.
    too_long = {"notes": ["x" * 100, "y" * 96]}  # 5 + 100 + 2 + 96 = 203
    response = post(client, answers_body(thread_id, item["id"], too_long))
    body = assert_json_error(response, 400, "input_too_long")
    assert "200" in body["message"]
    assert fake.count == count
    assert stored(client, thread_id, item["id"])["status"] == "pending"
    fits = {"notes": ["x" * 100, "y" * 93]}  # 200
    assert post(client, answers_body(thread_id, item["id"], fits)).status_code == 200
    assert fake.count == count + 1


def test_answers_count_against_the_message_limit(site: Flask, fake: FakeResponses) -> None:
    client = site.test_client()
    thread_id, item = ask(client, fake)  # 1 of 4
    post(client, create_body("two"))  # 2
    post(client, create_body("three"))  # 3
    assert post(client, answers_body(thread_id, item["id"], {"priority": ["Low"]})).status_code \
        == 200  # 4
    count = fake.count
    refused = post(client, create_body("five"))
    assert_refused_in_stream(refused, "too many messages")
    assert fake.count == count


def test_answers_are_charged_to_the_token_budget_which_then_refuses_them(
    fake: FakeResponses, store_url: str
) -> None:
    app = ticket_site(fake, store_url, CHATKIT_TOKENS_PER_USER="60 per day")
    try:
        client = app.test_client()
        # Two model calls, the second one reported as 100 tokens: more than the budget.
        thread_id, item = ask(client, fake, Reply(text=QUESTIONS, output_tokens=100))
        time.sleep(0.3)  # the charge is settled off the event loop once the stream ends
        count = fake.count
        refused = post(client, answers_body(thread_id, item["id"], {"priority": ["High"]}))
        assert_refused_in_stream(refused, "share of the assistant")
        assert fake.count == count
        assert stored(client, thread_id, item["id"])["status"] == "pending"
    finally:
        close_app(app)


def test_answers_take_a_stream_slot_like_a_message(
    fake: FakeResponses, store_url: str
) -> None:
    app = ticket_site(fake, store_url, CHATKIT_MAX_STREAMS_PER_USER=1)
    try:
        client = app.test_client()
        thread_id, item = ask(client, fake)
        # Another reply of the visitor's is on its way: it holds the only slot.
        fake.enqueue(Reply(text=" ".join(["word"] * 40), token_delay=0.1))
        count = fake.count + 1
        held = client.post(URL, data=json.dumps(create_body("a long one")),
                           content_type="application/json", buffered=False)
        next(iter(held.response))
        fake.wait_for(count)  # its model call is under way
        try:
            refused = post(client, answers_body(thread_id, item["id"], {"priority": ["High"]}))
            assert_refused_in_stream(refused, "replies on the way")
        finally:
            held.close()
        assert fake.count == count
        assert stored(client, thread_id, item["id"])["status"] == "pending"
        # The slot is given back: the same answers are taken now.
        taken = post(client, answers_body(thread_id, item["id"], {"priority": ["High"]}))
        assert taken.status_code == 200 and sse_events(taken.data)[-1]["type"] == "thread.item.done"
    finally:
        close_app(app)
