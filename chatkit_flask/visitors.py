"""What log-in and log-out do to the anonymous visitor.

An anonymous visitor's threads belong to the signed visitor cookie, not to the person: on a
shared computer, whoever uses the browser next is that visitor. So log-out forgets the visitor
(drops the cookie; the next chat request is a new visitor), and a site may choose to give the
visitor's threads to the account at log-in (``CHATKIT_ADOPT_VISITOR_THREADS``). With Flask-Login
both happen on its ``user_logged_out`` / ``user_logged_in`` signals; any other login system calls
:func:`forget_visitor` / :func:`adopt_visitor_threads` from its own views.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, after_this_request

from .identity import user_identity, visitor_cookie_name
from .web import current_visitor

if TYPE_CHECKING:
    from .state import ChatKitState

__all__ = ["adopt_visitor_threads", "connect_flask_login", "forget_visitor"]

log = logging.getLogger("chatkit_flask")

_MOVE_TIMEOUT = 30  # seconds: one atomic script or transaction, whatever the number of threads


def forget_visitor(state: ChatKitState) -> None:
    """Drop the visitor cookie with the current request's response: from the next request on the
    browser is a new anonymous visitor, and the old visitor's threads are out of its reach."""
    settings = state.settings
    name = visitor_cookie_name(settings.cookie_name, settings.cookie_secure)

    @after_this_request
    def drop_cookie(response: Response) -> Response:
        response.delete_cookie(
            name, path="/", secure=settings.cookie_secure, httponly=True, samesite="Lax"
        )
        return response


def adopt_visitor_threads(state: ChatKitState) -> int:
    """Give the current request's anonymous visitor's threads to the signed-in user (as the
    ``user_loader`` names them), then forget the visitor. Call it once the user is signed in.

    Atomic on every store: a reader sees all the threads moved or none. Returns how many moved:
    0 without a visitor cookie, without a signed-in user, or in hosted mode (its threads live
    with OpenAI under the ChatKit ``user``, which cannot be renamed).
    """
    user = user_identity(state.load_user())
    visitor = current_visitor(state)
    if state.server is None or user is None or visitor is None:
        return 0
    server = state.server
    moved = server.bridge.run(
        lambda: server.store.move_owner(visitor.limit_key, user.limit_key), _MOVE_TIMEOUT
    )
    forget_visitor(state)
    log.info("chatkit_flask: %d thread(s) of %s adopted by %s", moved, visitor.log_id, user.log_id)
    return int(moved)


def connect_flask_login(app: Flask, state: ChatKitState) -> None:
    """Hook Flask-Login's signals for ``app`` (when Flask-Login is installed), as the settings
    ask: log-out forgets the visitor, log-in adopts their threads."""
    try:
        from flask_login import user_logged_in, user_logged_out
    except ImportError:
        return
    settings = state.settings

    def on_logout(_app: Flask, **_: Any) -> None:
        forget_visitor(state)

    def on_login(_app: Flask, **_: Any) -> None:
        try:
            adopt_visitor_threads(state)
        except Exception as exc:  # the threads stay with the visitor; the log-in goes on
            log.warning("chatkit_flask: threads not adopted at log-in (%s)", type(exc).__name__)

    # weak=False: the handlers live as long as the app (blinker drops them with the app).
    if settings.forget_visitor_on_logout:
        user_logged_out.connect(on_logout, sender=app, weak=False)
    if settings.adopt_visitor_threads:
        user_logged_in.connect(on_login, sender=app, weak=False)
