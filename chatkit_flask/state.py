"""The per-app state the extension's views, CLI and metrics receive (kept in
``app.extensions["chatkit"]``): a plain object, so no module imports the extension itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Response
from flask_limiter import Limiter

from .identity import VisitorCookie
from .limits import LimitRule
from .settings import Settings

__all__ = ["ChatKitState", "RegisteredAction"]


@dataclass(frozen=True)
class RegisteredAction:
    """A site's widget-action handler (``@chatkit.action``); ``sync`` ones answer
    ``threads.sync_custom_action``, the others ``threads.custom_action``."""

    handler: Callable[..., Any]
    sync: bool = False


@dataclass
class ChatKitState:
    """What one app's ChatKit runs with."""

    settings: Settings
    limiter: Limiter  # holds the chat's limits: the extension's own or the host's
    cookie: VisitorCookie
    user_loader: Callable[[], Callable[[], Any] | None]
    client: Any = None  # hosted mode: the ChatKit sessions API client (upstream.ChatKitClient)
    server: Any = None  # server mode: the ChatKit server runtime (server.runtime.ServerRuntime)
    # The endpoint's Flask-Limiter limits, as its backend declared them (for the CLI).
    limit_endpoint: str = ""
    limit_rules: list[LimitRule] = field(default_factory=list)
    # Called with each response of the extension's endpoint (metrics); never on host routes.
    response_hooks: list[Callable[[Response], None]] = field(default_factory=list)
    # What /readyz probes besides the limiter storage, by component name (server mode: "store").
    # Each returns None when the component answers, else a short reason ("unreachable", ...).
    ready_checks: dict[str, Callable[[], str | None]] = field(default_factory=dict)

    def exempt(self, blueprint: Any) -> None:
        """Keep default and application limits off one of the extension's service blueprints
        (health, metrics, demo)."""
        self.limiter.exempt(blueprint)

    def load_user(self) -> Any:
        loader = self.user_loader()
        return loader() if loader is not None else None
