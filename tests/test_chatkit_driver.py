"""``ChatKitDriver``, the conversation helper sites use in their tests, against a recording app:
each method sends a valid ChatKit request of its type (checked with the SDK's own parser), one
driver keeps one visitor's cookie, streams are parsed into what the widget would show, and a
non-2xx answer raises with its status and error code.

The driver against the real server is exercised by test_server_actions.py and
test_server_tools.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("chatkit_flask.server.actions")  # before chatkit: it silences a warning

from chatkit.types import ChatKitReq
from flask import Flask, Response, request
from pydantic import TypeAdapter

from chatkit_flask.testing import ChatKitDriver, ChatKitHTTPError

THREAD = "thr_" + "a" * 32
WIDGET = {"id": "msg_w", "thread_id": THREAD, "created_at": "2026-12-05T10:00:00",
          "type": "widget", "widget": {"type": "Card", "children": []}}  # fmt: skip
ANSWER = {"id": "msg_a", "thread_id": THREAD, "created_at": "2026-12-05T10:00:01",
          "type": "assistant_message",
          "content": [{"type": "output_text", "text": "Pick ", "annotations": []},
                      {"type": "output_text", "text": "one.", "annotations": []}]}  # fmt: skip
CALL = {"id": "tc_1", "thread_id": THREAD, "created_at": "2026-12-05T10:00:02",
        "type": "client_tool_call", "status": "pending", "call_id": "call_1",
        "name": "get_location", "arguments": {}}  # fmt: skip
STREAM = [
    {"type": "thread.created", "thread": {"id": THREAD, "created_at": "2026-12-05T10:00:00",
                                          "status": {"type": "active"}, "metadata": {},
                                          "items": {"data": [], "has_more": False}}},
    {"type": "progress_update", "icon": "calendar", "text": "Looking up Monday..."},
    {"type": "thread.item.added", "item": {**WIDGET, "widget": {"type": "Card"}}},
    {"type": "thread.item.done", "item": WIDGET},
    {"type": "thread.item.done", "item": ANSWER},
    {"type": "thread.item.done", "item": CALL},
    {"type": "thread.updated", "thread": {"id": THREAD, "title": "Booking"}},
    {"type": "error", "code": "custom", "message": "Over budget.", "allow_retry": True},
]  # fmt: skip


@pytest.fixture
def recorder() -> Iterator[tuple[Flask, list[dict[str, Any]]]]:
    """An app at the default prefix that records each body and the visitor cookie it came
    with; it streams STREAM for streaming types, answers reads with JSON, and 404s ``missing``."""
    app = Flask("recorder")
    seen: list[dict[str, Any]] = []

    @app.post("/api/chatkit")
    def endpoint() -> Any:
        body = request.get_json()
        seen.append({"body": body, "cookie": request.cookies.get("visitor"),
                     "headers": dict(request.headers)})  # fmt: skip
        if body["params"].get("thread_id") == "thr_missing":
            return {"error": "not_found", "message": "No such thread.", "request_id": "r1"}, 404
        request_model = TypeAdapter(ChatKitReq).validate_python(body)  # the SDK's own parser
        if request_model.type in {"threads.create", "threads.add_user_message",
                                  "threads.custom_action", "threads.add_client_tool_output",
                                  "threads.retry_after_item"}:  # fmt: skip
            frames = "".join(f"data: {json.dumps(event)}\n\n" for event in STREAM)
            response = Response(frames, mimetype="text/event-stream")
        elif request_model.type == "threads.sync_custom_action":
            response = Response(json.dumps({"updated_item": WIDGET}), mimetype="application/json")
        else:
            response = Response(json.dumps({"data": [WIDGET], "has_more": False}),
                                mimetype="application/json")  # fmt: skip
        if request.cookies.get("visitor") is None:
            response.set_cookie("visitor", f"v{len(seen)}")
        return response

    yield app, seen


def test_every_method_sends_a_valid_request_of_its_type_with_one_visitors_cookie(
    recorder: tuple[Flask, list[dict[str, Any]]],
) -> None:
    app, seen = recorder
    chat = ChatKitDriver(app, headers={"X-User": "ada"})
    chat.send("hello")  # no thread yet: creates one
    assert chat.thread_id == THREAD
    chat.send("more")
    chat.action("book_slot", {"slot": "10:00"}, item_id="msg_w")
    assert chat.sync_action("book_slot", {"slot": "10:00"}, item_id="msg_w") == WIDGET
    chat.client_tool_output({"city": "Zurich"})
    chat.retry("msg_u")
    assert chat.items() == [WIDGET] and chat.threads() == [WIDGET]
    chat.thread()
    chat.rename("Booking")
    chat.feedback(["msg_a"], "positive")
    chat.delete()
    assert chat.thread_id is None  # the next send starts a new thread
    kinds = [entry["body"]["type"] for entry in seen]
    assert kinds == ["threads.create", "threads.add_user_message", "threads.custom_action",
                     "threads.sync_custom_action", "threads.add_client_tool_output",
                     "threads.retry_after_item", "items.list", "threads.list",
                     "threads.get_by_id", "threads.update", "items.feedback",
                     "threads.delete"]  # fmt: skip
    assert all(entry["body"]["params"].get("thread_id") in (None, THREAD) for entry in seen)
    assert seen[2]["body"]["params"] == {
        "thread_id": THREAD, "item_id": "msg_w",
        "action": {"type": "book_slot", "payload": {"slot": "10:00"}},
    }  # fmt: skip
    assert seen[4]["body"]["params"]["result"] == {"city": "Zurich"}
    assert [entry["cookie"] for entry in seen] == [None] + ["v1"] * 11  # one visitor
    assert all(entry["headers"]["X-User"] == "ada" for entry in seen)
    # Another driver on another test client is another visitor.
    ChatKitDriver(app).send("hi")
    assert seen[-1]["cookie"] is None


def test_a_stream_is_parsed_into_what_the_widget_shows(
    recorder: tuple[Flask, list[dict[str, Any]]],
) -> None:
    reply = ChatKitDriver(recorder[0]).send("hello")
    assert reply == STREAM and reply.response.status_code == 200
    assert reply.thread_id == THREAD
    assert reply.progress == ["Looking up Monday..."]
    assert reply.widgets == [WIDGET]  # the finished state, not the added one
    assert reply.text == "Pick one."
    assert reply.client_tool_call == CALL
    assert reply.title == "Booking"
    assert reply.error == "Over budget." and reply.errors == [STREAM[-1]]
    assert reply.items == [WIDGET, ANSWER, CALL]
    assert reply.types[:2] == ["thread.created", "progress_update"]


def test_a_refusal_raises_with_its_status_and_code(
    recorder: tuple[Flask, list[dict[str, Any]]],
) -> None:
    chat = ChatKitDriver(recorder[0])
    with pytest.raises(ChatKitHTTPError) as refused:
        chat.send("hello", thread_id="thr_missing")
    assert refused.value.status == 404 and refused.value.code == "not_found"
    assert refused.value.message == "No such thread." and refused.value.request_id == "r1"
    assert "HTTP 404 not_found" in str(refused.value)
    with pytest.raises(ValueError, match="no thread yet"):
        chat.action("book_slot")
