"""chatkit-flask: OpenAI ChatKit on a Flask site, behind rate limits and token budgets in Redis.

The names below are imported on first use (PEP 562), not with the package: gunicorn's master
loads server mode's worker class (``chatkit_flask.server.asgi_worker``) and must not import
Flask, the app's settings or prometheus-client on the way (workers import them fresh, after
the master has prepared the metrics directory, and a SIGHUP brings new code).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import ApiError
    from .extension import ChatKit, ChatKitState
    from .settings import ConfigError, Settings
    from .upstream import (
        ChatKitClient,
        ChatKitSession,
        UpstreamBusy,
        UpstreamError,
        UpstreamRejected,
        UpstreamTimeout,
        UpstreamUnavailable,
    )

_EXPORTS = {
    "ApiError": "errors",
    "ChatKit": "extension",
    "ChatKitState": "extension",
    "ConfigError": "settings",
    "Settings": "settings",
    "ChatKitClient": "upstream",
    "ChatKitSession": "upstream",
    "UpstreamBusy": "upstream",
    "UpstreamError": "upstream",
    "UpstreamRejected": "upstream",
    "UpstreamTimeout": "upstream",
    "UpstreamUnavailable": "upstream",
}

__all__ = [
    "ApiError",
    "ChatKit",
    "ChatKitClient",
    "ChatKitSession",
    "ChatKitState",
    "ConfigError",
    "Settings",
    "UpstreamBusy",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
