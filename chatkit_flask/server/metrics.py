"""Prometheus metrics of server mode, collected when ``init_metrics(app)`` finds a server runtime
(the ``/metrics`` endpoint and multiprocess mode are ``chatkit_flask.metrics``'s).

Three collection points, none of them in the request path's logic: a response hook reads the
facts the blueprint leaves on ``flask.g`` (request type, outcome, limit scope) and, for a stream,
registers a close callback that reads ``context.report`` (when the first frame and the model's
first output went out, the answer's outcome); a usage hook counts tokens and failed answers on
the event loop; the ChatKit server's store is wrapped to count its exceptions. Every label value
comes from a closed set: never an id, a text or anything the client chose.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Response, g
from prometheus_client import Counter, Gauge, Histogram

from .attachments import UPLOAD_TYPE
from .context import RequestContext
from .endpoint import stream_outcome
from .protocol import TokenUsage
from .request_rules import SUPPORTED_TYPES, UNSUPPORTED_TYPES, calls_model

if TYPE_CHECKING:
    from ..state import ChatKitState

__all__ = [
    "first_answer",
    "first_event",
    "init_server_metrics",
    "messages",
    "model_errors",
    "model_tokens",
    "refused",
    "requests",
    "store_errors",
    "stream_duration",
    "streams_open",
]

log = logging.getLogger("chatkit_flask")

# A reply's first frame (thread.created, the user's item) leaves before the model is called:
# normally well under a second, seconds when workers are saturated or the store is slow.
FIRST_EVENT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
# The model's first output: typically 0.5-3 s, more for a long history or a busy provider.
FIRST_ANSWER_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0,
                        30.0, 60.0, 120.0)  # fmt: skip
# Whole replies: a few seconds for a short answer, minutes for a long one (CHATKIT_MODEL_TIMEOUT
# bounds each silent gap, not the reply).
DURATION_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0,
                    120.0, 180.0, 300.0, 600.0)  # fmt: skip

MESSAGE_OUTCOMES = ("completed", "failed", "cancelled", "interrupted", "no_answer", "refused",
                    "not_found", "invalid", "unavailable", "error")  # fmt: skip
REFUSAL_SCOPES = ("user", "ip", "global", "requests", "streams", "streams_ip", "busy",
                  "thread_busy", "tokens", "tokens_global", "site")  # fmt: skip
REQUEST_TYPES = (*sorted(SUPPORTED_TYPES | UNSUPPORTED_TYPES), UPLOAD_TYPE, "unknown")

requests = Counter(
    "chatkit_requests",
    "Server mode: ChatKit requests (POST {prefix}) by type; 'unknown' when missing or not one.",
    ["type"],
)
messages = Counter(
    "chatkit_messages",
    "Server mode: messages (requests that call the model) by outcome: completed, failed, "
    "cancelled, no_answer, refused, not_found, invalid, unavailable, error.",
    ["outcome"],
)
refused = Counter(
    "chatkit_refused",
    "Server mode: requests refused by a limit, by scope (user, ip, global, requests, streams, "
    "tokens, tokens_global; site for the host app's own limits).",
    ["scope"],
)
streams_open = Gauge(
    "chatkit_streams_open",
    "Server mode: replies streaming now (summed over live workers).",
    multiprocess_mode="livesum",
)
first_event = Histogram(
    "chatkit_first_event_seconds",
    "Server mode: time from the request's arrival to the first frame of its stream.",
    buckets=FIRST_EVENT_BUCKETS,
)
first_answer = Histogram(
    "chatkit_first_answer_seconds",
    "Server mode: time from the request's arrival to the model's first output in its stream.",
    buckets=FIRST_ANSWER_BUCKETS,
)
stream_duration = Histogram(
    "chatkit_stream_duration_seconds",
    "Server mode: time from the request's arrival to the end of its stream, however it ended.",
    buckets=DURATION_BUCKETS,
)
model_tokens = Counter(
    "chatkit_model_tokens",
    "Server mode: model tokens as the provider reported them, by kind (input, output).",
    ["kind"],
)
model_errors = Counter(
    "chatkit_model_errors",
    "Server mode: answers that ended 'failed' (the model call raised; the visitor saw an error).",
)
store_errors = Counter(
    "chatkit_store_errors",
    "Server mode: exceptions from the thread store (a missing or foreign thread is not one).",
)

# Label values that should read 0 rather than be absent, so rate() and alerts work at once.
for _outcome in MESSAGE_OUTCOMES[:8]:
    messages.labels(_outcome)
for _scope in REFUSAL_SCOPES[:-1]:
    refused.labels(_scope)
for _type in REQUEST_TYPES:
    requests.labels(_type)
for _kind in ("input", "output"):
    model_tokens.labels(_kind)


# ------------------------------------------------------------------ collection


def _request_type() -> str:
    kind = g.get("chatkit_request_type")
    return kind if kind in REQUEST_TYPES else "unknown"


def _refusal_scope() -> str:
    scope = g.get("chatkit_limit_scope") or "user"
    return scope if scope in REFUSAL_SCOPES else "site"


def _answered_outcome(response: Response) -> str:
    """The outcome of a message that did not stream (refused, or failed before the stream)."""
    status = response.status_code
    if g.get("chatkit_refused") is not None or status == 429:
        return "refused"
    if status == 200:  # a transcription (dictation), answered with JSON
        return "completed"
    if status == 502:  # its model call failed
        return "failed"
    if status == 404:
        return "not_found"
    if status in (400, 409, 413, 415):  # 409: a client tool output nobody waits for
        return "invalid"
    if status == 503:
        return "unavailable"
    return "error"


def _on_response(response: Response) -> None:
    try:
        _record(response)
    except Exception:  # metrics must never break a response
        log.exception("chatkit_flask: recording server metrics failed")


def _record(response: Response) -> None:
    kind = _request_type()
    requests.labels(kind).inc()
    refusal = g.get("chatkit_refused") is not None or response.status_code == 429
    if refusal:
        refused.labels(_refusal_scope()).inc()
    streaming = response.mimetype == "text/event-stream" and not refusal
    if streaming:
        context: RequestContext = g.chatkit_context
        streams_open.inc()
        # Flask's request context is gone when the stream closes: take what the callback needs.
        response.call_on_close(_stream_closer(context.report, g.chatkit_started))
    elif calls_model(g.get("chatkit_request_type")):
        messages.labels(_answered_outcome(response)).inc()


def _stream_closer(report: dict[str, Any], started: float) -> Callable[[], None]:
    def closed() -> None:
        streams_open.dec()
        try:
            stream_duration.observe(time.perf_counter() - started)
            for key, histogram in (
                ("first_frame_at", first_event),
                ("first_answer_at", first_answer),
            ):
                if report.get(key) is not None:
                    histogram.observe(report[key] - started)
            messages.labels(stream_outcome(report)).inc()
        except Exception:
            log.exception("chatkit_flask: recording stream metrics failed")

    return closed


def _on_usage(context: RequestContext, usage: TokenUsage) -> None:
    """On the event loop, after every answer (the runtime logs a failure of this hook)."""
    model_tokens.labels("input").inc(max(0, usage.input_tokens))
    model_tokens.labels("output").inc(max(0, usage.output_tokens))
    if usage.outcome == "failed":
        model_errors.inc()


# ---------------------------------------------------------------------- wiring


def init_server_metrics(state: ChatKitState) -> None:
    """Collect server mode's metrics for the app whose state is ``state`` (once per app)."""
    runtime = state.server
    state.response_hooks.append(_on_response)
    runtime.usage_hooks.append(_on_usage)
    # The ChatKit server's store is the guard (store_guard.py): each failure it reports counts.
    runtime.server.store.failure_hooks.append(store_errors.inc)
