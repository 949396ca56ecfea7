"""Widget actions: a button's action, routed by name to a handler the site registered with
``@chatkit.action(name)`` (see :meth:`chatkit_flask.ChatKit.action`).

A streaming handler is an async generator of ChatKit events (``async def h(ctx): yield ...``);
a sync handler (``sync=True``) is a coroutine returning the sender's updated item, or None.
Both run inside a fresh app context of the host app, with the owner's thread and sender widget
already loaded (another owner's is a 404 before the handler runs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatkit.actions import Action
from chatkit.store import StoreItemType
from chatkit.types import ThreadMetadata, ThreadStreamEvent, WidgetItem

from .context import RequestContext

if TYPE_CHECKING:
    from .protocol import FlaskChatKitServer

__all__ = ["ActionContext", "ActionHandler"]


@dataclass
class ActionContext:
    """What an action handler gets: the caller's ``thread``, the ``action`` (its ``type`` and
    ``payload``), the ``sender`` widget item (None for an action sent without one) and the
    request ``context`` (``context.user_id`` is the signed-in user's id)."""

    thread: ThreadMetadata
    action: Action[str, Any]
    sender: WidgetItem | None
    context: RequestContext
    _server: FlaskChatKitServer

    @property
    def payload(self) -> Any:
        return self.action.payload

    def new_item_id(self, kind: StoreItemType = "message") -> str:
        """A fresh id for an item the handler adds to the thread."""
        return self._server.store.generate_item_id(kind, self.thread, self.context)

    def model_turn(self) -> AsyncIterator[ThreadStreamEvent]:
        """A new model turn on the thread as it is stored (yield its events from a streaming
        handler). It is limited and charged like a visitor's message."""
        return self._server.respond(self.thread, None, self.context)


ActionHandler = Callable[[ActionContext], Any]
