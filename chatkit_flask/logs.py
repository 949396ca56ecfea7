"""The mint log line, and the text or JSON formatting the standalone service logs with.

Only what is passed here is logged: request id, hashed visitor id, client IP, outcome and
upstream facts. Never the API key, a client secret or a raw cookie.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from flask import g, has_request_context

from .sanitize import escape_control

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "log_message",
    "log_mint",
    "mint_log",
]

mint_log = logging.getLogger("chatkit_flask.mint")
message_log = logging.getLogger("chatkit_flask.message")

_FIELDS = (
    "request_id",
    "outcome",
    "status",
    "visitor",
    "ip",
    "workflow",
    "upstream_status",
    "upstream_ms",
    "upstream_request_id",
    "attempts",
    "duration_ms",
    "scope",
    "error",
    "upstream_detail",
)


def _value(value: Any) -> str:
    # Quoted, with control characters, backslash and '"' escaped, whenever the raw text could end
    # its field or line early or reach a terminal: an upstream body or a request id with a
    # space, '=', a line break, a tab or ESC must not forge a field or a line.
    text = str(value)
    if text and escape_control(text) == text and not any(char in text for char in ' "=\\'):
        return text
    return '"' + escape_control(text, quoted=True) + '"'


def log_mint(fields: dict[str, Any]) -> None:
    """One line per mint request; warning level when it did not mint."""
    level = logging.INFO if fields.get("outcome") == "minted" else logging.WARNING
    if not mint_log.isEnabledFor(level):
        return
    text = " ".join(f"{key}={_value(fields[key])}" for key in _FIELDS if key in fields)
    mint_log.log(level, "mint %s", text, extra={"chatkit": fields})


_MESSAGE_FIELDS = (
    "request_id",
    "type",
    "outcome",
    "status",
    "visitor",
    "ip",
    "thread",
    "scope",
    "cause",
    "tokens_in",
    "tokens_out",
    "ttfe_ms",
    "first_answer_ms",
    "duration_ms",
)


_MESSAGE_OK = {"answered", "streamed", "completed", "cancelled", "no_answer"}


def log_message(fields: dict[str, Any]) -> None:
    """Server mode: one line per ChatKit request (never message text); warning level for a
    refusal or a failure."""
    ok = fields.get("status", 200) < 400 and fields.get("outcome") in _MESSAGE_OK
    level = logging.INFO if ok else logging.WARNING
    if not message_log.isEnabledFor(level):
        return
    text = " ".join(f"{key}={_value(fields[key])}" for key in _MESSAGE_FIELDS if key in fields)
    message_log.log(level, "chatkit %s", text, extra={"chatkit": fields})


class TextFormatter(logging.Formatter):
    """``time level [pid] logger: message``, one physical line per record: control characters
    in the message, the logger name and a traceback are escaped (a traceback's line breaks show
    as ``\\n``), so that no logged text can forge a line or reach a terminal as a sequence."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return escape_control(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the fields of a mint line
    (``"event": "mint"``) or of a server-mode request line (``"event": "message"``) if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "chatkit", None)
        if isinstance(fields, dict):
            entry["event"] = "message" if record.name == message_log.name else "mint"
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
            request_id = _request_id()
            if request_id:  # e.g. a limiter storage error logged while serving a mint
                entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def _request_id() -> str | None:
    try:
        return g.get("chatkit_request_id") if has_request_context() else None
    except Exception:
        return None


def configure_logging(level: str, fmt: str) -> None:
    """Route the package's logs to stderr in ``fmt`` ("text" or "json"). For the service only:
    a host app keeps its own logging set-up."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler._chatkit_flask = True  # type: ignore[attr-defined]
    # openai.agents: the Agents SDK logs model failures there (server mode); in the same format,
    # so JSON logs stay JSON, and escaped like every other line.
    for name in ("chatkit_flask", "flask-limiter", "openai.agents"):
        logger = logging.getLogger(name)
        # Replace only the handler an earlier call installed (an app factory may run twice).
        logger.handlers[:] = [h for h in logger.handlers if not getattr(h, "_chatkit_flask", 0)]
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
