"""chatkit-flask: mint OpenAI ChatKit client secrets from Flask, behind rate limits in Redis."""

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
