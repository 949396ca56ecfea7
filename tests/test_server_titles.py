"""Thread titles in server mode, through HTTP: after a thread's first answer a short model call
names it (``CHATKIT_TITLE_MODEL``), sent as ``thread.updated`` in the same stream after the
answer's last delta, charged with the answer's tokens; a failed call falls back to the start of
the first message; a title the visitor set is never replaced; ``off`` makes no call.

Titles are saved with the thread, so these run on every store (``store_url``), but for the last
three: which model titles and what the title call costs do not depend on the store (SQLite)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("chatkit")

from flask import Flask
from flask.testing import FlaskClient

from chatkit_flask.server.protocol import TokenUsage
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests import test_server_mode as mode
from tests.server_support import sse_events
from tests.test_server_mode import create_body, message_body, post

# The server-mode fixtures (the fake model, both stores, the app factory), shared.
_fake, fake, sqlite_url, make_app = (
    mode._fake, mode.fake, mode.sqlite_url, mode.make_app
)

TITLE_ON = {"CHATKIT_TITLE_MODEL": "gpt-title"}


@pytest.fixture
def client(make_app: Callable[..., Flask], store_url: str) -> FlaskClient:
    return make_app(store_url, **TITLE_ON).test_client()


def titles(client: FlaskClient) -> dict[str, str | None]:
    response = post(client, {"type": "threads.list", "params": {}})
    assert response.status_code == 200, response.data
    return {thread["id"]: thread.get("title") for thread in response.get_json()["data"]}


def start(client: FlaskClient, text: str) -> tuple[str, list[dict[str, Any]]]:
    response = post(client, create_body(text))
    assert response.status_code == 200, response.data
    events = sse_events(response.data)
    return events[0]["thread"]["id"], events


def model_calls(fake: FakeResponses) -> list[dict[str, Any]]:
    return [request.json for request in fake.requests if request.path.endswith("/responses")]


def test_a_new_thread_is_titled_after_its_answer_in_the_same_stream(
    client: FlaskClient, fake: FakeResponses
) -> None:
    fake.enqueue("Paris is the capital.", "French capital question")
    thread_id, events = start(client, "What is the capital of France?")

    kinds = [event["type"] for event in events]
    answer_done = max(i for i, e in enumerate(events) if e["type"] == "thread.item.done")
    assert kinds[-1] == "thread.updated" and answer_done < len(kinds) - 1
    assert events[-1]["thread"]["title"] == "French capital question"
    assert titles(client) == {thread_id: "French capital question"}

    answer_call, title_call = model_calls(fake)
    assert answer_call["stream"] is True and not title_call.get("stream")
    assert title_call["model"] == "gpt-title"
    assert title_call["max_output_tokens"] <= 24
    assert "What is the capital of France?" in str(title_call["input"])


def test_the_title_call_starts_only_after_the_answer_finished(
    client: FlaskClient, fake: FakeResponses
) -> None:
    fake.enqueue(Reply(text="one two three four", token_delay=0.05), "A title")
    _, events = start(client, "hello")

    deltas = [i for i, e in enumerate(events) if e["type"] == "thread.item.updated"]
    updated = [i for i, e in enumerate(events) if e["type"] == "thread.updated"]
    assert deltas and updated and max(deltas) < min(updated)
    # The fake answers in order: the answer's stream was whole before the title was asked for.
    assert fake.completed >= 1 and len(model_calls(fake)) == 2


def test_a_second_message_does_not_retitle(client: FlaskClient, fake: FakeResponses) -> None:
    fake.enqueue("first answer", "First title")
    thread_id, _ = start(client, "first question")
    response = post(client, message_body(thread_id, "second question"))

    assert response.status_code == 200
    assert not [e for e in sse_events(response.data) if e["type"] == "thread.updated"]
    assert titles(client) == {thread_id: "First title"}
    assert len(model_calls(fake)) == 3  # answer, title, answer


def test_a_title_the_visitor_set_is_kept(client: FlaskClient, fake: FakeResponses) -> None:
    fake.enqueue(Reply.error(500))  # the first answer fails: the thread stays untitled
    thread_id, _ = start(client, "first question")
    assert titles(client) == {thread_id: None}
    renamed = post(client, {"type": "threads.update",
                            "params": {"thread_id": thread_id, "title": "My own name"}})
    assert renamed.status_code == 200, renamed.data

    fake.clear()
    post(client, message_body(thread_id, "second question"))

    assert titles(client) == {thread_id: "My own name"}
    assert len(model_calls(fake)) == 1  # the answer only


def test_a_failed_title_call_falls_back_to_the_first_message(
    client: FlaskClient, fake: FakeResponses, mint_logs: pytest.LogCaptureFixture
) -> None:
    question = "Could you please explain how the tides work near the coast of Brittany?"
    fake.enqueue("The moon.", Reply.error(500, "upstream detail"))
    thread_id, events = start(client, question)

    title = titles(client)[thread_id]
    assert title == "Could you please explain how the tides work near…"
    assert events[-1]["type"] == "thread.updated" and events[-1]["thread"]["title"] == title
    [warning] = [r for r in mint_logs.records if r.name == "chatkit_flask.server.titles"]
    assert "InternalServerError" in warning.getMessage()  # the class, never the body or text
    assert "upstream detail" not in mint_logs.text and question not in mint_logs.text


def test_an_empty_title_from_the_model_falls_back_too(
    client: FlaskClient, fake: FakeResponses
) -> None:
    fake.enqueue("answer", "  ")
    thread_id, _ = start(client, "short question")
    assert titles(client) == {thread_id: "short question"}


def test_off_makes_no_title_call(
    make_app: Callable[..., Flask], store_url: str, fake: FakeResponses
) -> None:
    client = make_app(store_url, CHATKIT_TITLE_MODEL="off").test_client()
    thread_id, events = start(client, "hello")

    assert titles(client) == {thread_id: None}
    assert events[-1]["type"] == "thread.item.done"
    assert len(model_calls(fake)) == 1


def test_the_default_title_model_is_the_agents(
    make_app: Callable[..., Flask], sqlite_url: str, fake: FakeResponses
) -> None:
    client = make_app(sqlite_url, CHATKIT_TITLE_MODEL="").test_client()  # the default
    fake.enqueue("answer", "Greeting")
    thread_id, _ = start(client, "hello")

    assert titles(client) == {thread_id: "Greeting"}
    assert [call["model"] for call in model_calls(fake)] == ["gpt-test", "gpt-test"]


def test_the_title_calls_tokens_are_charged_with_the_answer(
    make_app: Callable[..., Flask], sqlite_url: str, fake: FakeResponses,
    mint_logs: pytest.LogCaptureFixture,
) -> None:
    app = make_app(sqlite_url, **TITLE_ON)
    charged: list[TokenUsage] = []
    app.extensions["chatkit"].server.usage_hooks.append(lambda _ctx, usage: charged.append(usage))
    fake.enqueue(Reply(text="answer", input_tokens=100, output_tokens=10),
                 Reply(text="A title", input_tokens=7, output_tokens=3))
    start(app.test_client(), "hello")

    [usage] = charged
    assert (usage.input_tokens, usage.output_tokens) == (107, 13)
    assert usage.charged_tokens == 120 and usage.requests == 2
    [line] = [r for r in mint_logs.records if r.name == "chatkit_flask.message"
              and r.chatkit["type"] == "threads.create"]
    assert (line.chatkit["tokens_in"], line.chatkit["tokens_out"]) == (107, 13)
    assert not [r for r in mint_logs.records if r.levelno >= logging.ERROR]


def test_a_title_call_that_hangs_is_cut_short_and_its_input_charged(
    make_app: Callable[..., Flask], sqlite_url: str, fake: FakeResponses,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("chatkit_flask.server.titles.TITLE_TIMEOUT", 0.3)
    app = make_app(sqlite_url, **TITLE_ON)
    charged: list[TokenUsage] = []
    app.extensions["chatkit"].server.usage_hooks.append(lambda _ctx, usage: charged.append(usage))
    fake.enqueue(Reply(text="answer", input_tokens=100, output_tokens=10), Reply.hang())
    client = app.test_client()
    thread_id, _ = start(client, "what about the weather")

    assert titles(client) == {thread_id: "what about the weather"}
    [usage] = charged
    assert usage.charged_tokens > 110  # the title request was sent: its input is charged
