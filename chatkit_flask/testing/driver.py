"""Drive ChatKit conversations against a site's own Flask app, as the ChatKit widget would.

A test writes what a visitor does (send a message, click a widget's button, hand back a client
tool's output) and reads what the widget would receive::

    chat = ChatKitDriver(app.test_client())
    reply = chat.send("Book me a table")          # creates the thread, streams the answer
    assert reply.text == "Which time suits you?"
    (card,) = reply.widgets
    chat.action("book_slot", {"slot": "19:00"}, item_id=card["id"])
    assert [item["type"] for item in chat.items()][-1] == "assistant_message"

Every request goes through the Flask test client to the extension's endpoint
(``CHATKIT_URL_PREFIX``), so the visitor cookie, the user loader, limits, budgets and the store
all take part. The client keeps its cookies: one driver is one visitor (another visitor is
another driver on a new test client). Streams are read to their end (which frees the stream
slot) and parsed into :class:`Events`; a JSON answer is parsed into a dict. A non-2xx answer
raises :class:`ChatKitHTTPError` (status and error code); a refusal inside a stream is an
``error`` event (:attr:`Events.errors`), as the widget sees it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

__all__ = ["ChatKitDriver", "ChatKitHTTPError", "Events", "parse_sse"]

DEFAULT_URL = "/api/chatkit"


class ChatKitHTTPError(AssertionError):
    """The endpoint answered with a non-2xx status (an ``AssertionError``: in a test that did
    not expect it, pytest shows the status, the error code and the message)."""

    def __init__(self, response: TestResponse) -> None:
        self.response = response
        self.status = response.status_code
        body = response.get_json(silent=True)
        body = body if isinstance(body, dict) else {}
        self.code: str | None = body.get("error")
        self.message: str | None = body.get("message")
        self.request_id: str | None = body.get("request_id")
        super().__init__(f"HTTP {self.status} {self.code}: {self.message}")


def parse_sse(body: bytes | str) -> list[dict[str, Any]]:
    """The JSON payloads of a stream's ``data:`` frames, in order."""
    text = body.decode() if isinstance(body, bytes) else body
    events = []
    for frame in text.split("\n\n"):
        data = [line[6:] for line in frame.split("\n") if line.startswith("data: ")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


class Events(list[dict[str, Any]]):
    """The events of one stream, in order (plain dicts, as the widget receives them), with
    the views a test usually wants. ``response`` is the HTTP response (status, headers)."""

    def __init__(
        self, events: Iterable[dict[str, Any]], response: TestResponse, thread_id: str | None = None
    ) -> None:
        super().__init__(events)
        self.response = response
        self._thread_id = thread_id

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The events of type ``kind`` (``"thread.item.done"``, ``"progress_update"``, ...)."""
        return [event for event in self if event.get("type") == kind]

    @property
    def types(self) -> list[str]:
        return [event.get("type", "") for event in self]

    @property
    def thread_id(self) -> str | None:
        """The thread this stream belongs to (a new thread's id for ``threads.create``)."""
        for event in self.of("thread.created"):
            return event["thread"]["id"]
        for event in self:
            item = event.get("item")
            if isinstance(item, dict) and item.get("thread_id"):
                return item["thread_id"]
        return self._thread_id

    @property
    def items(self) -> list[dict[str, Any]]:
        """The items finished in this stream (``thread.item.done``), hidden ones never sent."""
        return [event["item"] for event in self.of("thread.item.done")]

    @property
    def text(self) -> str:
        """The text of the finished assistant messages, one line per message."""
        return "\n".join(
            "".join(part.get("text", "") for part in item.get("content", []))
            for item in self.items
            if item.get("type") == "assistant_message"
        )

    @property
    def widgets(self) -> list[dict[str, Any]]:
        """Widget items finished (or replaced) in this stream, in order: their final state."""
        return [
            event["item"]
            for event in self
            if event.get("type") in ("thread.item.done", "thread.item.replaced")
            and event["item"].get("type") == "widget"
        ]

    @property
    def progress(self) -> list[str]:
        """The texts of the progress updates, in order."""
        return [event.get("text", "") for event in self.of("progress_update")]

    @property
    def client_tool_call(self) -> dict[str, Any] | None:
        """The client tool call this stream ended on (the widget runs it), or None."""
        calls = [item for item in self.items if item.get("type") == "client_tool_call"]
        return calls[-1] if calls else None

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The ``error`` events (``code``, ``message``, ``allow_retry``)."""
        return self.of("error")

    @property
    def error(self) -> str | None:
        """The message of the last error event (its code when it has none), or None."""
        if not self.errors:
            return None
        last = self.errors[-1]
        return last.get("message") or last.get("code")

    @property
    def title(self) -> str | None:
        """The thread's title as the last ``thread.updated`` event set it, or None."""
        updates = self.of("thread.updated")
        return updates[-1]["thread"].get("title") if updates else None


class ChatKitDriver:
    """One visitor talking to the ChatKit endpoint of a Flask app.

    ``client`` is a Flask test client (or the app: a new test client is made). ``headers`` go
    with every request (a sign-in header, ``Accept-Language``); each method also takes
    ``headers``. ``url`` defaults to the app's ``CHATKIT_URL_PREFIX``. :attr:`thread_id` is
    the thread the last stream was about; methods that need a thread use it unless given one.
    """

    def __init__(
        self,
        client: FlaskClient | Flask,
        *,
        headers: Mapping[str, str] | None = None,
        url: str | None = None,
    ) -> None:
        self.client = client.test_client() if isinstance(client, Flask) else client
        self.headers = dict(headers or {})
        self.url = url or _endpoint(self.client.application)
        self.thread_id: str | None = None

    # --------------------------------------------------------------- messages
    def new_thread(self, text: str, *, attachments: Iterable[str] = (), **kwargs: Any) -> Events:
        """``threads.create`` with ``text`` (and the ids of uploaded ``attachments``, see
        :meth:`attach`); the new thread becomes :attr:`thread_id`."""
        params = {"input": user_input(text, attachments)}
        return self.stream("threads.create", params, **kwargs)

    def send(
        self,
        text: str,
        *,
        thread_id: str | None = None,
        attachments: Iterable[str] = (),
        **kwargs: Any,
    ) -> Events:
        """A message on the current thread (``threads.add_user_message``), or a new thread's
        first message when there is none yet; ``attachments``: ids from :meth:`attach`."""
        thread_id = thread_id or self.thread_id
        if thread_id is None:
            return self.new_thread(text, attachments=attachments, **kwargs)
        params = {"thread_id": thread_id, "input": user_input(text, attachments)}
        return self.stream("threads.add_user_message", params, **kwargs)

    def attach(
        self,
        data: bytes,
        name: str = "file",
        mime_type: str = "image/png",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Upload a file the way the widget does (``attachments.create``, then a multipart
        POST of the bytes to the upload URL); the uploaded attachment (its ``id`` goes in
        :meth:`send`'s ``attachments``). A refusal of either step raises."""
        params = {"name": name, "size": len(data), "mime_type": mime_type}
        created = self.call("attachments.create", params, headers=headers)
        url = created["upload_descriptor"]["url"]
        response = self.client.post(
            urlsplit(url).path,
            data={"file": (io.BytesIO(data), name, mime_type)},
            content_type="multipart/form-data",
            headers={**self.headers, **(headers or {})},
        )
        _raise_for_status(response)
        return dict(response.get_json())

    def retry(self, item_id: str, *, thread_id: str | None = None, **kwargs: Any) -> Events:
        """``threads.retry_after_item``: answer the visitor's message ``item_id`` again."""
        params = {"thread_id": self._thread(thread_id), "item_id": item_id}
        return self.stream("threads.retry_after_item", params, **kwargs)

    # ---------------------------------------------------------------- actions
    def action(
        self,
        name: str,
        payload: Any = None,
        *,
        item_id: str | None = None,
        thread_id: str | None = None,
        **kwargs: Any,
    ) -> Events:
        """A widget's streaming action (``threads.custom_action``): ``name`` and ``payload``,
        sent from the widget item ``item_id`` (None: an action without a sender)."""
        params = _action_params(self._thread(thread_id), name, payload, item_id)
        return self.stream("threads.custom_action", params, **kwargs)

    def sync_action(
        self,
        name: str,
        payload: Any = None,
        *,
        item_id: str | None = None,
        thread_id: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | None:
        """A widget's sync action (``threads.sync_custom_action``): the updated item the
        handler returned, or None."""
        params = _action_params(self._thread(thread_id), name, payload, item_id)
        answer = self.call("threads.sync_custom_action", params, **kwargs)
        return answer.get("updated_item")

    def client_tool_output(
        self, result: Any, *, thread_id: str | None = None, **kwargs: Any
    ) -> Events:
        """``threads.add_client_tool_output``: the browser's answer to the pending client tool
        call of the thread; the run continues in the returned stream."""
        params = {"thread_id": self._thread(thread_id), "result": result}
        return self.stream("threads.add_client_tool_output", params, **kwargs)

    # ------------------------------------------------------------------ reads
    def items(
        self,
        *,
        thread_id: str | None = None,
        order: str = "asc",
        limit: int | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """The thread's visible items as a reload shows them (``items.list``, oldest first)."""
        params: dict[str, Any] = {"thread_id": self._thread(thread_id), "order": order}
        if limit is not None:
            params["limit"] = limit
        return self.call("items.list", params, **kwargs)["data"]

    def threads(self, *, limit: int | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        """The visitor's threads, newest first (``threads.list``)."""
        params = {} if limit is None else {"limit": limit}
        return self.call("threads.list", params, **kwargs)["data"]

    def thread(self, thread_id: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """One thread with its first items (``threads.get_by_id``)."""
        return self.call("threads.get_by_id", {"thread_id": self._thread(thread_id)}, **kwargs)

    # ------------------------------------------------------------------ edits
    def rename(self, title: str, *, thread_id: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """``threads.update``: the visitor names the thread."""
        params = {"thread_id": self._thread(thread_id), "title": title}
        return self.call("threads.update", params, **kwargs)

    def delete(self, *, thread_id: str | None = None, **kwargs: Any) -> None:
        """``threads.delete``; the current thread is forgotten when it is the one deleted."""
        target = self._thread(thread_id)
        self.call("threads.delete", {"thread_id": target}, **kwargs)
        if target == self.thread_id:
            self.thread_id = None

    def feedback(
        self, item_ids: list[str], kind: str, *, thread_id: str | None = None, **kwargs: Any
    ) -> None:
        """``items.feedback`` (``kind``: ``"positive"`` or ``"negative"``) on answers."""
        params = {"thread_id": self._thread(thread_id), "item_ids": item_ids, "kind": kind}
        self.call("items.feedback", params, **kwargs)

    # ------------------------------------------------------------- raw access
    def stream(self, kind: str, params: Mapping[str, Any], **kwargs: Any) -> Events:
        """Any streaming request: the parsed events (a non-2xx answer raises)."""
        response = self.post({"type": kind, "params": dict(params)}, **kwargs)
        _raise_for_status(response)
        if response.mimetype != "text/event-stream":
            raise AssertionError(f"{kind} answered {response.mimetype}, not an event stream")
        events = Events(parse_sse(response.data), response, params.get("thread_id"))
        self.thread_id = events.thread_id or self.thread_id
        return events

    def call(self, kind: str, params: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Any JSON request: the parsed answer (a non-2xx answer raises)."""
        response = self.post({"type": kind, "params": dict(params)}, **kwargs)
        _raise_for_status(response)
        answer = response.get_json()
        return answer if isinstance(answer, dict) else {}

    def post(self, body: Any, *, headers: Mapping[str, str] | None = None) -> TestResponse:
        """POST ``body`` (JSON, or bytes as they are) to the endpoint; the response is read to
        its end. Nothing is checked: for tests of refusals and malformed bodies."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(
            self.url,
            data=data,
            content_type="application/json",
            headers={**self.headers, **(headers or {})},
            buffered=True,
        )

    def _thread(self, thread_id: str | None) -> str:
        thread_id = thread_id or self.thread_id
        if thread_id is None:
            raise ValueError("no thread yet: send a message first, or pass thread_id")
        return thread_id


def user_input(text: str, attachments: Iterable[str] = ()) -> dict[str, Any]:
    """A message's ``input`` as the widget sends it: one text part and attachment ids."""
    return {"content": [{"type": "input_text", "text": text}], "attachments": list(attachments),
            "inference_options": {}}  # fmt: skip


def _action_params(thread_id: str, name: str, payload: Any, item_id: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"thread_id": thread_id, "action": {"type": name, "payload": payload}}
    if item_id is not None:
        params["item_id"] = item_id
    return params


def _raise_for_status(response: TestResponse) -> None:
    if not 200 <= response.status_code < 300:
        raise ChatKitHTTPError(response)


def _endpoint(app: Flask) -> str:
    state = app.extensions.get("chatkit")
    settings = getattr(state, "settings", None)
    return getattr(settings, "url_prefix", None) or DEFAULT_URL
