"""One ChatKit request in, one Flask response out (no routing, identity or limits here).

A stream's first frame is read before any header is sent, so a missing or foreign thread is a
plain 404 rather than a 200 stream that stops short. After that, frames go out as they come: the
response body is a generator the WSGI server writes chunk by chunk, and closing it (gunicorn does
when the client goes away) cancels the answer on the event loop, and with it the model request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response

from ..errors import ApiError
from .bridge import AsyncBridge
from .context import RequestContext
from .protocol import (
    ActionFailed,
    FlaskChatKitServer,
    NotFoundError,
    RequestRefused,
    StoreFailed,
)
from .store import STORE_ERRORS
from .store_guard import STORE_DOWN_MESSAGE

log = logging.getLogger("chatkit_flask")

__all__ = ["HEARTBEAT_FRAME", "STREAM_HEADERS", "handle", "stream_outcome"]

STREAM_HEADERS = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx: pass frames through instead of buffering the answer
}
HEARTBEAT_FRAME = b": keep-alive\n\n"  # an SSE comment: EventSource-style parsers skip it
NOT_FOUND_MESSAGE = "No such conversation."
MISFIT_MESSAGE = "The request does not fit this conversation."
ACTION_FAILED_MESSAGE = "The action could not be completed. Please try again."
RESTART_MESSAGE = "The chat is restarting. Please send your message again in a moment."


def handle(
    server: FlaskChatKitServer,
    bridge: AsyncBridge,
    body: bytes,
    context: RequestContext,
    *,
    timeout: float = 30.0,
    stream_idle_timeout: float | None = None,
    heartbeat: float | None = None,
    write_timeout: float | None = None,
    on_stall: Callable[[], None] | None = None,
) -> Response:
    """Answer one ChatKit request body for ``context.owner``.

    Raises :class:`~chatkit_flask.errors.ApiError`: 400 ``invalid_request`` /
    ``unsupported_request`` / ``unsupported_action`` / ``input_too_long`` before any work, 404
    ``not_found`` for a thread or item that is missing or not the owner's, 500 ``action_failed``
    when a site's sync action handler raised, 503 ``store_unavailable`` when the thread store
    fails before the answer starts. ``timeout`` bounds a non-streaming request;
    ``stream_idle_timeout`` (None: the model client's own timeout applies) bounds each wait for
    the next frame. ``heartbeat`` (seconds; off by default) sends an SSE comment line during
    silences, so proxies keep the connection and a visitor who left is noticed (and the model
    request cancelled) even while the model is silent. ``write_timeout`` and ``on_stall``: a
    client that stops reading is dropped (see :meth:`AsyncBridge.stream`).
    """
    try:
        request = server.parse(body)
    except RequestRefused as exc:
        raise ApiError(400, exc.code, exc.message) from None
    except NotFoundError:  # an id the store could not have issued: the store is not asked
        raise ApiError(404, "not_found", NOT_FOUND_MESSAGE) from None

    if not server.is_streaming(request):
        try:
            payload = bridge.run(lambda: server.call(request, context), timeout)
        except NotFoundError:
            raise ApiError(404, "not_found", NOT_FOUND_MESSAGE) from None
        except ValueError:  # the SDK's own checks (e.g. an item of the wrong kind)
            raise ApiError(400, "invalid_request", MISFIT_MESSAGE) from None
        except TimeoutError:
            raise ApiError(503, "timeout", "The request took too long. Please try again.") from None
        except ActionFailed:
            raise ApiError(500, "action_failed", ACTION_FAILED_MESSAGE) from None
        except (StoreFailed, *STORE_ERRORS) as exc:
            raise _store_unavailable(exc, context) from None
        response = Response(payload, mimetype="application/json")
        response.headers["Cache-Control"] = "no-store"
        return response

    frames = bridge.stream(
        lambda: server.stream(request, context),
        idle_timeout=stream_idle_timeout,
        heartbeat=heartbeat,
        heartbeat_item=HEARTBEAT_FRAME,
        write_timeout=write_timeout,
        on_stall=on_stall,
        drain_item=lambda: _interrupted(context.report),
    )
    try:
        first = next(frames)
        while first == HEARTBEAT_FRAME:  # headers wait for real news (a 404 must stay a 404)
            first = next(frames)
    except StopIteration:
        first = b""  # nothing to say (e.g. retry after an item that is not in the thread)
    except NotFoundError:
        raise ApiError(404, "not_found", NOT_FOUND_MESSAGE) from None
    except ValueError:
        raise ApiError(400, "invalid_request", MISFIT_MESSAGE) from None
    except (StoreFailed, *STORE_ERRORS) as exc:
        raise _store_unavailable(exc, context) from None
    body = _SseBody(first, frames, context.report)
    response = Response(body, mimetype="text/event-stream")
    response.headers.update(STREAM_HEADERS)
    return response


def _interrupted(report: dict[str, Any]) -> bytes:
    """The last frame of a reply the server's shutdown ended (its partial answer is kept)."""
    report["interrupted"] = True
    event = {"type": "error", "code": "custom", "message": RESTART_MESSAGE, "allow_retry": True}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _store_unavailable(exc: Exception, context: RequestContext) -> ApiError:
    # Named here: the blueprint's handler for Redis errors would blame the rate limiter. The
    # class only: a driver's message can quote a host or a key.
    if not isinstance(exc, StoreFailed):  # the store guard has logged that one
        log.error(
            "chatkit_flask: thread store failed: %s [%s]", type(exc).__name__, context.request_id
        )
    return ApiError(503, "store_unavailable", STORE_DOWN_MESSAGE, headers={"Retry-After": "5"})


class _SseBody:
    """The stream body: the frame already read, then the rest as it comes.

    A class rather than a generator so that ``close()`` reaches the bridge's generator even if the
    server closes us before the first iteration (a closed, never-started generator would not
    propagate the close, and the answer would run on unobserved).

    Notes in ``report`` when the first frame went out (``first_frame_at``, a
    ``time.perf_counter()`` value) and whether the stream ran to its end (``exhausted``), for the
    log line and the metrics.
    """

    def __init__(
        self,
        first: bytes,
        rest: Iterator[bytes],
        report: dict[str, Any],
    ) -> None:
        self._first = first
        self._rest = rest
        self._report = report

    def __iter__(self) -> Iterator[bytes]:
        if self._first:
            self._report["first_frame_at"] = time.perf_counter()
            yield self._first
        yield from self._rest
        self._report["exhausted"] = True

    def close(self) -> None:
        close = getattr(self._rest, "close", None)
        if close is not None:
            close()


def stream_outcome(report: dict[str, Any]) -> str:
    """How a stream ended, once closed: ``interrupted`` when the server's shutdown ended it;
    ``failed`` when the store failed; else the answer's ``completed``, ``failed`` or
    ``cancelled``; ``refused`` when a token budget refused it inside the stream; without an
    answer, ``cancelled`` if the stream was cut short, else ``no_answer`` (e.g. a retry of an
    item that is not in the thread)."""
    if report.get("interrupted"):
        return "interrupted"
    if report.get("store_failed"):  # even after the model's answer: it was not kept
        return "failed"
    if report.get("refused_scope"):
        return "refused"
    usage = report.get("usage")
    if usage is not None:
        return str(usage.outcome)
    return "no_answer" if report.get("exhausted") else "cancelled"
