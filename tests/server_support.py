"""Test helpers for server mode: a trivial owner-scoped in-memory store and SSE parsing.

The real stores (SQLite, Redis) live in ``chatkit_flask.server.store*``; this one only has to obey
the same contract: every read and write is scoped by ``context.owner``, and another owner's
thread or item is ``NotFoundError``.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from chatkit.store import NotFoundError, Store, StoreItemType
from chatkit.types import Attachment, Page, ThreadItem, ThreadMetadata

from chatkit_flask.server.context import RequestContext

_PREFIX = {"message": "msg", "sdk_hidden_context": "shcx", "tool_call": "tc", "workflow": "wf",
           "task": "tsk", "attachment": "atc", "thread": "thr"}


class MemoryStore(Store[RequestContext]):
    """Threads and items per owner, in insertion order (one process only)."""

    def __init__(self) -> None:
        # owner -> thread id -> (metadata, item id -> item)
        self.data: dict[str, dict[str, tuple[ThreadMetadata, dict[str, ThreadItem]]]] = {}

    def generate_thread_id(self, context: RequestContext) -> str:
        return "thr_" + secrets.token_hex(16)

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: RequestContext
    ) -> str:
        return f"{_PREFIX.get(item_type, 'itm')}_{secrets.token_hex(16)}"

    def _thread(self, thread_id: str, context: RequestContext) -> tuple[ThreadMetadata, dict]:
        try:
            return self.data[context.owner][thread_id]
        except KeyError:
            raise NotFoundError(f"thread {thread_id} not found") from None

    async def load_thread(self, thread_id: str, context: RequestContext) -> ThreadMetadata:
        return self._thread(thread_id, context)[0].model_copy(deep=True)

    async def save_thread(self, thread: ThreadMetadata, context: RequestContext) -> None:
        threads = self.data.setdefault(context.owner, {})
        items = threads[thread.id][1] if thread.id in threads else {}
        threads[thread.id] = (ThreadMetadata(**thread.model_dump(exclude={"items"})), items)

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: RequestContext
    ) -> Page[ThreadItem]:
        items = list(self._thread(thread_id, context)[1].values())
        return _page(items, after, limit, order)

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: RequestContext
    ) -> Page[ThreadMetadata]:
        threads = [meta for meta, _ in self.data.get(context.owner, {}).values()]
        return _page(threads, after, limit, order)

    async def add_thread_item(
        self, thread_id: str, item: ThreadItem, context: RequestContext
    ) -> None:
        self._thread(thread_id, context)[1][item.id] = item.model_copy(deep=True)

    async def save_item(self, thread_id: str, item: ThreadItem, context: RequestContext) -> None:
        self._thread(thread_id, context)[1][item.id] = item.model_copy(deep=True)

    async def load_item(
        self, thread_id: str, item_id: str, context: RequestContext
    ) -> ThreadItem:
        try:
            return self._thread(thread_id, context)[1][item_id]
        except KeyError:
            raise NotFoundError(f"item {item_id} not found") from None

    async def delete_thread(self, thread_id: str, context: RequestContext) -> None:
        self._thread(thread_id, context)
        del self.data[context.owner][thread_id]

    async def delete_thread_item(
        self, thread_id: str, item_id: str, context: RequestContext
    ) -> None:
        self._thread(thread_id, context)[1].pop(item_id, None)

    async def save_attachment(self, attachment: Attachment, context: RequestContext) -> None:
        raise NotImplementedError("attachments are not supported")

    async def load_attachment(self, attachment_id: str, context: RequestContext) -> Attachment:
        raise NotFoundError(attachment_id)

    async def delete_attachment(self, attachment_id: str, context: RequestContext) -> None:
        raise NotFoundError(attachment_id)


def _page(records: list[Any], after: str | None, limit: int, order: str) -> Page[Any]:
    if order == "desc":
        records = records[::-1]
    if after is not None:
        ids = [r.id for r in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    data = records[:limit]
    has_more = len(records) > limit
    return Page(data=data, has_more=has_more, after=data[-1].id if has_more and data else None)


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of ``data:`` frames, in order."""
    frames = body.decode().split("\n\n")
    return [json.loads(f[6:]) for f in frames if f.startswith("data: ")]


def user_input(text: str) -> dict[str, Any]:
    return {"content": [{"type": "input_text", "text": text}], "attachments": [],
            "inference_options": {}}


def make_app(server: Any, bridge: Any) -> Any:
    """A tiny Flask app: ``POST /chat`` -> ``handle``; the owner comes from ``X-Owner``."""
    from flask import Flask, g, request

    from chatkit_flask.errors import ApiError, error_response
    from chatkit_flask.server.endpoint import handle

    app = Flask(__name__)
    app.register_error_handler(ApiError, error_response)

    @app.post("/chat")
    def chat() -> Any:
        g.chatkit_request_id = "req-" + secrets.token_hex(4)
        context = RequestContext(
            owner=request.headers.get("X-Owner", "visitor:alice"),
            request_id=g.chatkit_request_id,
        )
        return handle(server, bridge, request.get_data(), context)

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    return app
