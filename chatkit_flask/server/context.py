"""What the ChatKit server knows about a request, passed explicitly: the Flask request context is
gone while a stream's task runs on the background event loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RequestContext"]


@dataclass(frozen=True)
class RequestContext:
    """The caller of one ChatKit request.

    ``owner`` scopes every store read and write: ``"visitor:<tag>"`` for an anonymous visitor or
    ``"user:<tag>"`` for a signed-in user (tags are SHA-256 based; never the raw cookie or id).
    Another owner's thread or item is ``NotFoundError``, never its content. ``owner`` is the
    extension's key; site code (tools, an agent factory) reads ``user_id``: the id the site's
    user loader returned, as a string (``"1"`` for ``1``), or None for an anonymous visitor.
    """

    owner: str
    request_id: str = "-"
    client_network: str = "-"
    user_id: str | None = None
    locale: str | None = None
    # The absolute URL of the ChatKit endpoint (``https://site/api/chatkit``): upload and
    # preview URLs are built on it, off the request.
    base_url: str = ""
    # Filled while the request runs (token usage, outcome, when the first frame and the
    # model's first output went out) and read by the log line, the metrics and the token budget
    # once the stream ends. Never holds message text.
    report: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
