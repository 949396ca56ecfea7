"""What the ChatKit server sees of the thread store: a failure that a visitor can read.

The SDK turns an unknown exception inside a stream into a bare ``stream.error`` event and logs
its traceback; one raised between its own steps (saving the visitor's message after
``thread.created``) escapes the stream and cuts it without a word. :class:`GuardedStore` turns
every store failure (Redis gone, SQLite locked past its busy timeout, a full disk) into
:class:`StoreFailed`, a ``CustomStreamError`` the SDK shows as an ``error`` event with
:data:`STORE_DOWN_MESSAGE`, logs it once (the store's kind, the operation, the exception class
and the request id: never a URL, a key or message text), and notes it in the request's report
so the log line and the metrics call the answer ``failed``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from chatkit.errors import CustomStreamError
from chatkit.store import NotFoundError, Store, StoreItemType
from chatkit.types import ThreadMetadata

from .context import RequestContext
from .store import store_error_types

__all__ = ["STORE_DOWN_MESSAGE", "GuardedStore", "StoreFailed"]

log = logging.getLogger("chatkit_flask")

STORE_DOWN_MESSAGE = "The chat cannot reach its conversations right now. Please try again shortly."
NOT_SAVED_MESSAGE = "The answer could not be saved. Please send your message again."
# Writes of a reply's items: a thread that vanished under them (its data lost, its file deleted,
# deleted meanwhile) is a failure to save, not a "no such conversation" answer.
_ITEM_WRITES = frozenset({"add_thread_item", "save_item"})


class StoreFailed(CustomStreamError):
    """The thread store failed (already logged). Before a stream's first frame the endpoint
    answers 503 ``store_unavailable``; inside a stream it is an ``error`` event."""

    def __init__(self, message: str = STORE_DOWN_MESSAGE) -> None:
        super().__init__(message, allow_retry=True)


def _context_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> RequestContext | None:
    context = kwargs.get("context", args[-1] if args else None)
    return context if isinstance(context, RequestContext) else None


def _described(exc: BaseException) -> str:
    """The exception's class, and for SQLite the driver's first line ("attempt to write a
    readonly database"): it names no secret. Other drivers' messages can quote a URL."""
    if isinstance(exc, sqlite3.Error) and str(exc):
        return f"{type(exc).__name__} ({str(exc).splitlines()[0][:200]})"
    return type(exc).__name__


def _record(
    store: GuardedStore, name: str, what: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Log the failure once, mark the request's report (its outcome: ``failed``) and tell the
    store's failure hooks (the metrics count it)."""
    for hook in store.failure_hooks:
        hook()
    context = _context_of(args, kwargs)
    if context is not None:
        context.report["store_failed"] = True
    log.error(
        "chatkit_flask: thread store failed: %s in %s: %s [%s]",
        getattr(store.inner, "kind", type(store.inner).__name__),
        name,
        what,
        context.request_id if context is not None else "-",
    )


def _guarded(name: str) -> Callable[..., Awaitable[Any]]:
    async def method(self: GuardedStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self.inner, name)(*args, **kwargs)
        except NotFoundError:
            if name not in _ITEM_WRITES:
                raise  # a missing or foreign thread: an answer (404), not a failure
            _record(self, name, "thread vanished", args, kwargs)
            raise StoreFailed(NOT_SAVED_MESSAGE) from None
        except store_error_types() as exc:
            _record(self, name, _described(exc), args, kwargs)
            raise StoreFailed(
                NOT_SAVED_MESSAGE if name in _ITEM_WRITES else STORE_DOWN_MESSAGE
            ) from None

    method.__name__ = method.__qualname__ = name
    return method


class GuardedStore(Store[RequestContext]):
    """``inner`` with its failures raised as :class:`StoreFailed`; otherwise the same store
    (a missing or foreign thread is still ``NotFoundError``; other attributes go to ``inner``)."""

    def __init__(self, inner: Store[RequestContext]) -> None:
        self.inner = inner
        self.failure_hooks: list[Callable[[], None]] = []  # called once per failure

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def generate_thread_id(self, context: RequestContext) -> str:
        return self.inner.generate_thread_id(context)

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: RequestContext
    ) -> str:
        return self.inner.generate_item_id(item_type, thread, context)

    load_thread = _guarded("load_thread")
    save_thread = _guarded("save_thread")
    load_thread_items = _guarded("load_thread_items")
    load_threads = _guarded("load_threads")
    add_thread_item = _guarded("add_thread_item")
    save_item = _guarded("save_item")
    load_item = _guarded("load_item")
    delete_thread = _guarded("delete_thread")
    delete_thread_item = _guarded("delete_thread_item")
    save_attachment = _guarded("save_attachment")
    load_attachment = _guarded("load_attachment")
    delete_attachment = _guarded("delete_attachment")
