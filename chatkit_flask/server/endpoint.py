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
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from flask import Response

from ..errors import ApiError
from .attachments import AttachmentNotFound
from .bridge import AsyncBridge
from .context import RequestContext
from .loop_stream import LoopStream
from .protocol import (
    ActionFailed,
    AttachmentRefused,
    DictationFailed,
    FlaskChatKitServer,
    NotFoundError,
    OverBudget,
    RequestRefused,
    StaleToolOutput,
    StoreFailed,
)
from .store import store_error_types
from .store_guard import STORE_DOWN_MESSAGE

log = logging.getLogger("chatkit_flask")

__all__ = ["HEARTBEAT_FRAME", "STREAM_HEADERS", "handle", "over_budget", "refused_attachment",
           "store_unavailable", "stream_outcome"]

STREAM_HEADERS = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx: pass frames through instead of buffering the answer
}
HEARTBEAT_FRAME = b": keep-alive\n\n"  # an SSE comment: EventSource-style parsers skip it
NOT_FOUND_MESSAGE = "No such conversation."
MISFIT_MESSAGE = "The request does not fit this conversation."
ACTION_FAILED_MESSAGE = "The action could not be completed. Please try again."
DICTATION_FAILED_MESSAGE = "The recording could not be transcribed. Please try again."
RESTART_MESSAGE = "The chat is restarting. Please send your message again in a moment."
STALE_TOOL_OUTPUT_MESSAGE = "This conversation is not waiting for a client tool's output."


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
    on_loop: bool = False,
) -> Response:
    """Answer one ChatKit request body for ``context.owner``.

    Raises :class:`~chatkit_flask.errors.ApiError`: 400 ``invalid_request`` /
    ``unsupported_request`` / ``unsupported_action`` / ``input_too_long`` (413
    ``audio_too_large``) before any work; an attachment refused (see ``attachments``) with its
    own status and code; 404 ``not_found`` for a thread or item that is missing or not the
    owner's, 409 ``no_pending_tool_call`` for a client tool output the thread does not wait on
    (see :class:`~chatkit_flask.server.protocol.StaleToolOutput`), 500 ``action_failed`` when
    a site's sync action handler raised, 429 ``token_budget`` when dictation's reservation
    finds a token budget spent, 502 ``transcription_failed`` when dictation's model
    call failed, 503 ``store_unavailable`` when the thread store fails before the answer starts.
    ``timeout`` bounds a non-streaming request;
    ``stream_idle_timeout`` (None: the model client's own timeout applies) bounds each wait for
    the next frame. ``heartbeat`` (seconds; off by default) sends an SSE comment line during
    silences, so proxies keep the connection and a visitor who left is noticed (and the model
    request cancelled) even while the model is silent. ``write_timeout`` and ``on_stall``: a
    client that stops reading is dropped (see :meth:`AsyncBridge.stream`). ``on_loop``: the
    body is written by the event loop (server mode's ASGI worker, ``server/asgi.py``): frames
    after the first never cross to a thread, and the adapter applies ``write_timeout``.
    """
    try:
        request = server.parse(body)
    except RequestRefused as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    except NotFoundError as exc:  # an id the store could not have issued: it is not asked
        raise not_found(exc) from None

    if not server.is_streaming(request):
        try:
            payload = bridge.run(lambda: server.call(request, context), timeout)
        except NotFoundError as exc:
            raise not_found(exc) from None
        except ValueError:  # the SDK's own checks (e.g. an item of the wrong kind)
            raise ApiError(400, "invalid_request", MISFIT_MESSAGE) from None
        except TimeoutError:
            raise ApiError(503, "timeout", "The request took too long. Please try again.") from None
        except ActionFailed:
            raise ApiError(500, "action_failed", ACTION_FAILED_MESSAGE) from None
        except AttachmentRefused as exc:
            raise refused_attachment(exc) from None
        except DictationFailed:
            raise ApiError(502, "transcription_failed", DICTATION_FAILED_MESSAGE) from None
        except OverBudget as spent:
            raise over_budget(spent) from None
        except (StoreFailed, *store_error_types()) as exc:
            raise store_unavailable(exc, context.request_id) from None
        response = Response(payload, mimetype="application/json")
        response.headers["Cache-Control"] = "no-store"
        return response

    frames: Iterator[bytes] | LoopStream
    try:
        if on_loop:
            frames = LoopStream(
                bridge,
                lambda: server.stream(request, context),
                idle_timeout=stream_idle_timeout,
                heartbeat=heartbeat,
                heartbeat_item=HEARTBEAT_FRAME,
                drain_item=lambda: _interrupted(context.report),
            )
            first = frames.first() or b""  # b"": nothing to say (e.g. retry of a missing item)
        else:
            frames = bridge.stream(
                lambda: server.stream(request, context),
                idle_timeout=stream_idle_timeout,
                heartbeat=heartbeat,
                heartbeat_item=HEARTBEAT_FRAME,
                write_timeout=write_timeout,
                on_stall=on_stall,
                drain_item=lambda: _interrupted(context.report),
            )
            first = _first_frame(frames)
    except NotFoundError as exc:
        raise not_found(exc) from None
    except StaleToolOutput:
        raise ApiError(409, "no_pending_tool_call", STALE_TOOL_OUTPUT_MESSAGE) from None
    except ValueError:
        raise ApiError(400, "invalid_request", MISFIT_MESSAGE) from None
    except AttachmentRefused as exc:
        raise refused_attachment(exc) from None
    except (StoreFailed, *store_error_types()) as exc:
        raise store_unavailable(exc, context.request_id) from None
    body = _SseBody(first, frames, context.report)
    response = Response(body, mimetype="text/event-stream")
    response.headers.update(STREAM_HEADERS)
    return response


def not_found(exc: NotFoundError) -> ApiError:
    """The 404 for a thread, item or attachment that is missing or another's, naming which."""
    if isinstance(exc, AttachmentNotFound):
        return ApiError(404, "not_found", AttachmentNotFound.message)
    return ApiError(404, "not_found", NOT_FOUND_MESSAGE)


def over_budget(spent: OverBudget) -> ApiError:
    """A spent token budget as the JSON error (the view's own check answers the same)."""
    wait = spent.retry_after
    return ApiError(429, "token_budget", spent.message, headers={"Retry-After": str(wait)},
                    extra={"retry_after": wait, "scope": spent.scope})  # fmt: skip


def refused_attachment(exc: AttachmentRefused) -> ApiError:
    """An attachment refusal as the JSON error (429s with their ``Retry-After``)."""
    if exc.retry_after is None:
        return ApiError(exc.status, exc.code, exc.message)
    wait = exc.retry_after
    return ApiError(exc.status, exc.code, exc.message, headers={"Retry-After": str(wait)},
                    extra={"retry_after": wait})  # fmt: skip


def _first_frame(frames: Iterator[bytes]) -> bytes:
    """The first real frame (headers wait for real news: a 404 must stay a 404); b"" when the
    stream ends with nothing to say (e.g. a retry of an item that is not in the thread)."""
    try:
        first = next(frames)
        while first == HEARTBEAT_FRAME:
            first = next(frames)
    except StopIteration:
        return b""
    return first


def _interrupted(report: dict[str, Any]) -> bytes:
    """The last frame of a reply the server's shutdown ended (its partial answer is kept)."""
    report["interrupted"] = True
    event = {"type": "error", "code": "custom", "message": RESTART_MESSAGE, "allow_retry": True}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def store_unavailable(exc: Exception, request_id: str) -> ApiError:
    # Named here: the blueprint's handler for Redis errors would blame the rate limiter. The
    # class only: a driver's message can quote a host or a key.
    if not isinstance(exc, StoreFailed):  # the store guard has logged that one
        log.error(
            "chatkit_flask: thread store failed: %s [%s]", type(exc).__name__, request_id
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
        rest: Iterator[bytes] | LoopStream,
        report: dict[str, Any],
    ) -> None:
        self._first = first
        self._rest = rest
        self._report = report

    def __iter__(self) -> Iterator[bytes]:
        if self._first:
            self._report["first_frame_at"] = time.perf_counter()
            yield self._first
        yield from self._rest  # type: ignore[misc]
        self._report["exhausted"] = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """On the loop (a :class:`LoopStream` body under the ASGI worker)."""
        if self._first:
            self._report["first_frame_at"] = time.perf_counter()
            yield self._first
        async for frame in self._rest:  # type: ignore[union-attr]
            yield frame
        self._report["exhausted"] = True

    async def aclose(self) -> None:
        aclose = getattr(self._rest, "aclose", None)
        if aclose is not None:
            await aclose()

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
