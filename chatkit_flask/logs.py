"""Logging: the ``chatkit_flask`` logger hierarchy, its per-request lines, and the standalone
service's set-up.

Everything the package logs goes through loggers under ``chatkit_flask`` (``chatkit_flask.mint``:
one line per mint; ``chatkit_flask.message``: one line per server-mode request; others for
failures), which a host app configures like any other logger. The two per-request lines carry
their fields as structured data too: ``record.chatkit`` is a dict (request id, outcome, tokens,
timings), for a site's JSON formatter. Only what is passed here is logged: request id, hashed
visitor id, client network, outcome, counts and timings. Never the API key, a client secret, a
raw cookie or message text.

In a host app, :func:`init_app_logging` follows Flask's habit for ``app.logger``: INFO unless the
site set a level, and a default stderr handler only when no handler would receive the records.
The service (:func:`configure_logging`) owns its process: every logger, asyncio's, the SDKs' and
Python's warnings included, goes out in ``CHATKIT_LOG_FORMAT``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import g, has_request_context
from flask.logging import has_level_handler, wsgi_errors_stream

from .sanitize import escape_control

__all__ = [
    "LOGGER_NAME",
    "SERVICE_ONLY_SETTINGS",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "default_handler",
    "held_records",
    "init_app_logging",
    "log_message",
    "log_mint",
    "mint_log",
    "replay",
]

LOGGER_NAME = "chatkit_flask"
# Read by the standalone service's configure_logging alone: a host app configures the
# chatkit_flask logger itself (``flask chatkit check`` says so next to them).
SERVICE_ONLY_SETTINGS = ("CHATKIT_LOG_LEVEL", "CHATKIT_LOG_FORMAT")
mint_log = logging.getLogger(f"{LOGGER_NAME}.mint")
message_log = logging.getLogger(f"{LOGGER_NAME}.message")

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
    "queued_ms",
    "admitted_ms",
    "ttfe_ms",
    "model_called_ms",
    "model_delta_ms",
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


# A host app's records when the site configured no handler for them (Flask's default_handler
# does the same for app.logger): time, level, pid and logger, one escaped line each. A site that
# sets up logging after init_app removes it: logging.getLogger("chatkit_flask").removeHandler(
# chatkit_flask.logs.default_handler).
default_handler = logging.StreamHandler(wsgi_errors_stream)  # type: ignore[arg-type]
default_handler.setFormatter(TextFormatter())


def init_app_logging() -> None:
    """Make the package's records visible in a host app the way Flask makes ``app.logger``'s:
    the ``chatkit_flask`` logger gets INFO if the site set no level (the per-request lines are
    INFO), and :data:`default_handler` if no handler up its hierarchy would receive them. A site
    that configured logging (``basicConfig``, ``dictConfig``) gets the records through its own
    handlers, once. ``CHATKIT_LOG_LEVEL`` and ``CHATKIT_LOG_FORMAT`` are the service's only."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not has_level_handler(logger):
        logger.addHandler(default_handler)


# The package's own records, and those of libraries whose INFO lines belong to a request's story
# (openai.agents: model failures in server mode; flask-limiter: storage failures); every other
# logger (asyncio, openai, httpx, py.warnings, ...) from WARNING up, through the root logger.
_SERVICE_LOGGERS = (LOGGER_NAME, "flask-limiter", "openai.agents")


def configure_logging(level: str, fmt: str) -> None:
    """The service's logging: every record to stderr in ``fmt`` ("text" or "json"), one line
    each, the package's loggers at ``level`` and all others at WARNING or above (``level`` if
    higher), Python's warnings included. Calling it again replaces what the last call set.
    For the standalone service only: a host app keeps its own logging set-up."""
    handler = logging.StreamHandler(_CurrentStderr())  # type: ignore[arg-type]
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler._chatkit_flask = True  # type: ignore[attr-defined]
    for name in _SERVICE_LOGGERS:
        logger = logging.getLogger(name)
        _replace_handler(logger, handler)
        logger.setLevel(level)
        logger.propagate = False  # not twice through the root logger's handler
    root = logging.getLogger()
    _replace_handler(root, handler)
    root.setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # warnings.warn() as a "py.warnings" record (through the handler above), not raw text.
    logging.captureWarnings(True)


class _CurrentStderr:
    """``sys.stderr`` as it is when a record is written, not as it was at set-up: the root
    logger's handler outlives a replaced stream (a test's capture)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _replace_handler(logger: logging.Logger, handler: logging.Handler) -> None:
    # Only the handler an earlier call installed (an app factory may run twice); others stay.
    logger.handlers[:] = [h for h in logger.handlers if not getattr(h, "_chatkit_flask", 0)]
    logger.addHandler(handler)


@contextmanager
def held_records() -> Iterator[list[logging.LogRecord]]:
    """Hold the package's records (e.g. "X is not a setting of this service") while the service
    reads the settings that say how to log; :func:`replay` them once logging is configured, so
    they come out in that format too. On an exception they are replayed at once, through
    whatever handlers there are, and nothing is lost."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = logger.handlers[:], logger.propagate
    held: list[logging.LogRecord] = []
    collector = logging.Handler()
    collector.emit = held.append  # type: ignore[method-assign]
    logger.handlers[:], logger.propagate = [collector], False
    try:
        yield held
    except BaseException:
        logger.handlers[:], logger.propagate = saved
        replay(held)
        raise
    logger.handlers[:], logger.propagate = saved


def replay(records: list[logging.LogRecord]) -> None:
    """Log held records again, through the handlers and levels configured now."""
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
