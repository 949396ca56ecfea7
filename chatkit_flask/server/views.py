"""Server backend: ``POST {prefix}`` is the ChatKit endpoint chatkit-js's ``api.url`` points at
(request -> identity -> limits -> ChatKit server -> JSON or event stream).

Limits: ``CHATKIT_RATELIMIT_PER_USER``/``_PER_IP``/``_GLOBAL`` count **messages** (the request
types that call the model); ``CHATKIT_RATELIMIT_REQUESTS_PER_IP`` counts every request. A refused
message never reaches the model. Refusals of a message are answered the way the ChatKit UI shows
them, inside the stream: a 200 ``text/event-stream`` holding one ``error`` event with the wait
time (and a ``Retry-After`` header); refusals of a read are a 429 JSON.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, g, jsonify, request, url_for
from flask_limiter import Limiter

from ..errors import ApiError, error_response
from ..identity import hash_id
from ..limits import LimitRule, active_storage, limit_rules, limited, network_key
from ..logs import log_message
from ..settings import Settings
from ..state import RegisteredAction
from ..web import (
    begin_request,
    new_blueprint,
    read_json_body,
    register_error_handlers,
    resolve_caller,
    set_visitor_cookie,
)
from .asgi import LOOP_KEY, RECEIVED_KEY, hand_over
from .attachment_http import content_headers, upload_chunks
from .attachments import UPLOAD_TYPE, AttachmentRefused, files_down
from .context import RequestContext
from .endpoint import (
    RESTART_MESSAGE,
    STREAM_HEADERS,
    handle,
    refused_attachment,
    store_unavailable,
    stream_outcome,
)
from .files import storage_errors
from .protocol import NotFoundError, StoreFailed
from .request_rules import RequestRefused, calls_model, streams
from .runtime import BUDGET_MESSAGES, ServerRuntime
from .slots import Slot
from .store import store_error_types

if TYPE_CHECKING:
    from ..state import ChatKitState

__all__ = ["create_runtime", "make_server_blueprint"]

ENDPOINT = "chatkit.chatkit"  # also ``POST {prefix}/uploads/<token>``: one per-IP counter
CONFIG_ENDPOINT = "chatkit.config"
DOWNLOAD_ENDPOINT = "chatkit.attachment"
# chatkit-js requires a domainKey; OpenAI checks real ones against the domain allowlist, and
# on localhost any value passes (the one OpenAI's samples use).
DOMAIN_KEY_PLACEHOLDER = "domain_pk_localhost_dev"
HEARTBEAT_SECONDS = 15.0  # an SSE comment during model silences: proxies keep the stream open
_LIMIT_MESSAGES = {
    "user": "You have sent too many messages",
    "ip": "Too many messages came from your network",
    "net48": "Too many messages came from your network",
    "global": "The chat is very busy right now",
    "requests": "Too many requests came from your network",
    "streams": "You already have replies on the way",
    **BUDGET_MESSAGES,
}


# A reply needs every one of these slots (cheapest first); the first that is full refuses it.
_STREAM_CAPS = (
    ("worker_streams", "busy", "The chat is very busy right now. Please try again in a moment."),
    ("slots", "streams", "You already have replies on the way. Wait for them to finish."),
    ("network_streams", "streams_ip",
     "Too many replies are on their way to your network. Wait for them to finish."),
    ("thread_replies", "thread_busy",
     "A reply is still being written in this conversation. Send again when it is done."),
)  # fmt: skip


def _take_stream_slots(
    runtime: ServerRuntime, context: RequestContext, thread_id: str | None, holds: list[Slot]
) -> ApiError | None:
    """Take the slots a streaming reply needs into ``holds``; the refusal when one is full."""
    keys = {
        "worker_streams": "worker",
        "slots": context.owner,
        "network_streams": context.client_network,
        "thread_replies": f"{context.owner}:{thread_id}" if thread_id else None,
    }
    for name, scope, message in _STREAM_CAPS:
        if keys[name] is None:
            continue  # threads.create: a new thread has no reply yet
        held = getattr(runtime, name).acquire(keys[name])
        if held is None:
            return ApiError(
                429,
                "thread_busy" if scope == "thread_busy" else "too_many_streams",
                message,
                headers={"Retry-After": "5"},
                extra={"retry_after": 5, "scope": scope},
            )
        holds.append(held)
    return None


def _socket_shutdown(environ: dict[str, Any]) -> Callable[[], None] | None:
    """What drops a client that stopped reading: shutting its socket down makes the server's
    blocked write fail at once (gunicorn puts the socket in the environ; other servers: None,
    and only the answer is cancelled)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None

    def shutdown() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    return shutdown


def create_runtime(
    settings: Settings,
    limiter: Callable[[], Limiter],
    app: Flask,
    actions: Mapping[str, RegisteredAction] | None = None,
    store_engine: Any = None,
) -> ServerRuntime:
    """Build server mode's parts (raises ``ConfigError`` naming the key); ``limiter`` gives
    the limiter once it exists (the stream slots count in its storage); the site's agent code
    runs inside app contexts of ``app``, whose instance folder holds the default thread store
    and ``@file`` instructions; ``actions`` are the site's widget-action handlers by name;
    ``store_engine`` is the host's database for the SQL store (see ``ChatKit``)."""
    return ServerRuntime(
        settings, lambda: active_storage(limiter()), app, actions, store_engine=store_engine
    )


def _is_read() -> bool:
    return not g.get("chatkit_is_message", False)


def _rules(state: ChatKitState) -> list[LimitRule]:
    """Message limits (exempt for reads), then the per-IP limit on every request."""
    settings = state.settings
    rules = limit_rules(settings, exempt_when=_is_read, counter="messages")
    if settings.limit_requests_per_ip:
        rules.append(
            LimitRule("requests", settings.limit_requests_per_ip, network_key, None, "requests")
        )
    return rules


def refused_in_stream(error: ApiError) -> Response:
    """A refused message as the ChatKit UI shows it: one ``error`` event in a 200 stream. Other
    requests (reads, and anything that does not stream) get the JSON error."""
    if not streams(g.get("chatkit_request_type")):
        return error_response(error)
    g.chatkit_outcome = error.code
    g.chatkit_refused = error
    event = {"type": "error", "code": "custom", "message": error.message, "allow_retry": True}
    response = Response(f"data: {json.dumps(event)}\n\n", mimetype="text/event-stream")
    response.headers.update(STREAM_HEADERS)
    response.headers.update(error.headers)
    return response


def make_server_blueprint(state: ChatKitState) -> Blueprint:
    """The ``chatkit`` blueprint of the server backend: ``POST {prefix}`` and ``GET
    {prefix}/config``."""
    settings = state.settings
    runtime: ServerRuntime = state.server
    bp = new_blueprint(state)
    guard = {"done": False}
    longest = max(settings.max_input_chars, settings.client_tool_max_chars)
    max_body = max(64 * 1024, longest * 4 + 32 * 1024)
    # Dictation's body carries the recording in base64: only that type may be this large (the
    # slack lets a recording just over its cap get the precise 413 from the server's check).
    audio_body = 4 * ((settings.transcribe_max_bytes + 2) // 3) + 64 * 1024
    max_audio_body = max(max_body, audio_body) if settings.transcribe_model else max_body

    def acceptable(raw: bytes) -> bool:
        """Whether the server will take this body (cheap: one cached pydantic adapter)."""
        try:
            runtime.server.parse(raw)
        except (RequestRefused, NotFoundError):
            return False
        return True

    @bp.before_app_request
    def use_serving_loop() -> None:
        """Under server mode's ASGI worker the SDKs run on the loop that serves HTTP."""
        loop = request.environ.get(LOOP_KEY)
        if loop is not None and not runtime.bridge.uses(loop):
            runtime.adopt(loop)

    @bp.before_request
    def prepare() -> None:
        begin_request(state, guard)
        if request.endpoint not in (ENDPOINT, CONFIG_ENDPOINT) or request.method == "OPTIONS":
            return  # a CORS preflight is answered without an identity (and sets no cookie)
        resolve_caller(state)
        if request.endpoint != ENDPOINT or request.method != "POST":
            return
        if request.view_args:  # an upload: its body is the file, read by the view as it comes
            g.chatkit_request_type, g.chatkit_is_message, g.chatkit_body = UPLOAD_TYPE, False, b""
            return
        raw, body = read_json_body(max_audio_body, allow_empty=False)
        kind = body.get("type")
        if len(raw) > max_body and kind != "input.transcribe":
            raise ApiError(413, "payload_too_large", "The request body is too large.")
        g.chatkit_request_type = kind if isinstance(kind, str) else None
        # Only a message the server will take counts against the message limits; one it refuses
        # with a 400 (too long, malformed, attachments) falls under the requests limit alone.
        g.chatkit_is_message = calls_model(g.chatkit_request_type) and acceptable(raw)
        g.chatkit_body = raw
        # The thread a message answers in (threads.create makes a new one): one reply at a time.
        params = body.get("params")
        thread_id = params.get("thread_id") if isinstance(params, dict) else None
        g.chatkit_thread_id = thread_id if isinstance(thread_id, str) else None

    def chatkit(token: str | None = None) -> Response:
        """One ChatKit request for the caller (or the bytes of an upload, with ``token``)."""
        if request.method != "POST":
            raise ApiError(405, "method_not_allowed", "Use POST.", headers={"Allow": "POST"})
        if token is not None:
            return upload(token)
        identity = g.chatkit_identity
        context = RequestContext(
            owner=identity.limit_key,
            request_id=g.chatkit_request_id,
            client_network=g.get("chatkit_client_network", "-"),
            user_id=identity.user_id,
            locale=request.accept_languages.best,
            base_url=url_for(ENDPOINT, _external=True),
        )
        g.chatkit_context = context
        context.report["view_at"] = time.perf_counter()  # identity and limits are behind us
        context.report["received_at"] = request.environ.get(RECEIVED_KEY)
        owner = identity.limit_key
        slot = g.chatkit_is_message and streams(g.chatkit_request_type)
        spent = runtime.budget.exceeded(owner) if g.chatkit_is_message else None
        if spent is not None:
            scope, wait = spent
            g.chatkit_limit_scope = scope
            return refused_in_stream(
                ApiError(
                    429,
                    "token_budget",
                    f"{_LIMIT_MESSAGES[scope]}. Try again in {wait} seconds.",
                    headers={"Retry-After": str(wait)},
                    extra={"retry_after": wait, "scope": scope},
                )
            )
        if g.chatkit_is_message and runtime.bridge.draining:
            # Shutting down: open replies get the drain time; a new one would be cut short.
            return refused_in_stream(
                ApiError(503, "shutting_down", RESTART_MESSAGE, headers={"Retry-After": "5"})
            )
        holds: list[Slot] = []
        if slot:
            refusal = _take_stream_slots(runtime, context, g.chatkit_thread_id, holds)
            if refusal is not None:
                for hold in holds:
                    hold.release()
                g.chatkit_limit_scope = refusal.extra["scope"]
                return refused_in_stream(refusal)
        on_loop = LOOP_KEY in request.environ
        try:
            response = handle(
                runtime.server,
                runtime.bridge,
                g.chatkit_body,
                context,
                timeout=settings.model_timeout,
                heartbeat=HEARTBEAT_SECONDS,
                write_timeout=settings.stream_write_timeout,
                on_stall=None if on_loop else _socket_shutdown(request.environ),
                on_loop=on_loop,
            )
        except BaseException as exc:
            for hold in holds:
                hold.release()
            if isinstance(exc, ApiError) and exc.code == "token_budget":
                g.chatkit_limit_scope = exc.extra["scope"]  # dictation's reservation refused
            raise
        started = g.chatkit_started
        fields = _log_fields(response)
        for hold in holds:
            if response.is_streamed:
                response.response = hold.hold(response.response)
            else:  # an answer decided before any stream: nothing to hold
                hold.release()
        if response.is_streamed and on_loop:
            hand_over(request.environ, response.response, settings.stream_write_timeout)
        if response.mimetype == "text/event-stream":
            g.chatkit_outcome = "streamed"
            # The line is written when the stream ends, however it ends.
            response.call_on_close(lambda: _log_stream(fields, context, started))
        else:
            g.chatkit_outcome = "answered"
        return response

    def upload(token: str) -> Response:
        """The bytes for an ``attachments.create`` upload URL (see ``attachments``)."""
        attachments = runtime.attachments
        if attachments is None:
            raise ApiError(404, "not_found", "No such upload.")
        chunks = upload_chunks(request.stream, request.content_type or "",
                               settings.attachment_max_bytes)  # fmt: skip
        try:
            done = attachments.accept_upload(
                token, chunks, lambda factory: runtime.bridge.run(factory, settings.model_timeout)
            )
        except AttachmentRefused as exc:
            g.chatkit_outcome = exc.code
            raise refused_attachment(exc) from None
        except (StoreFailed, *store_error_types()) as exc:
            raise store_unavailable(exc, g.chatkit_request_id) from None
        g.chatkit_outcome = "uploaded"
        payload = done.model_dump_json(context={"exclude_metadata": True})
        return Response(payload, mimetype="application/json")

    state.limit_endpoint, state.limit_rules = ENDPOINT, _rules(state)
    view = limited(chatkit, state.limiter, state.limit_rules)
    bp.add_url_rule("", "chatkit", view, methods=["GET", "POST"])
    if runtime.attachments is not None:
        # The same endpoint, so uploads count in the same per-IP request counter.
        bp.add_url_rule("/uploads/<token>", "chatkit", view, methods=["POST"])

        @bp.get("/attachments/<token>")
        def attachment(token: str) -> Response:
            """An attachment's bytes for a signed link from its owner's thread (previews run
            in OpenAI's iframe, which sends no cookie of this site)."""
            attachments = runtime.attachments
            assert attachments is not None
            try:
                mime, name, body = attachments.open_download(token)
            except NotFoundError:
                raise ApiError(404, "not_found", "No such attachment.") from None
            except storage_errors() as exc:
                raise refused_attachment(files_down(exc)) from None
            return Response(body, headers=content_headers(mime, name), direct_passthrough=True)

    @bp.get("/config")
    def config() -> Response:
        """What the page needs to configure chatkit-js; issues the visitor cookie first, so the
        widget's first parallel requests agree on who the visitor is."""
        extra: dict[str, Any] = {}
        if runtime.attachments is not None:
            # chatkit-js shows the upload button only with composer.attachments.enabled, and
            # uploads through attachments.create only with the two-phase strategy.
            extra["uploadStrategy"] = {"type": "two_phase"}
            extra["attachments"] = {
                "enabled": True,
                "maxSize": settings.attachment_max_bytes,
                "maxCount": settings.attachments_per_message,
                "accept": {mime: [] for mime in settings.attachment_types},
            }
        response = jsonify(
            backend="server",
            url=url_for(ENDPOINT),
            domainKey=settings.domain_key or DOMAIN_KEY_PLACEHOLDER,
            **extra,
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.after_request
    def finish(response: Response) -> Response:
        if request.endpoint not in (ENDPOINT, CONFIG_ENDPOINT):
            return response
        response.headers["Cache-Control"] = "no-store"
        set_visitor_cookie(state, response)
        if request.endpoint == ENDPOINT and request.method == "POST":
            for hook in state.response_hooks:
                hook(response)
            if response.mimetype != "text/event-stream" or g.get("chatkit_refused"):
                log_message(_log_fields(response))
        return response

    register_error_handlers(bp, state, _LIMIT_MESSAGES, refused_in_stream)
    return bp


def _log_fields(response: Response) -> dict[str, Any]:
    identity = g.get("chatkit_identity")
    fields: dict[str, Any] = {
        "request_id": g.get("chatkit_request_id", "-"),
        "type": g.get("chatkit_request_type") or "-",
        "outcome": g.get("chatkit_outcome") or f"http_{response.status_code}",
        "status": response.status_code,
        "visitor": identity.log_id if identity is not None else "-",
        "ip": g.get("chatkit_client_network") or "-",
    }
    scope = g.get("chatkit_limit_scope")
    if scope:
        fields["scope"] = scope
    body = g.get("chatkit_body")
    if body:
        try:
            thread = json.loads(body).get("params", {}).get("thread_id")
        except (ValueError, AttributeError):
            thread = None
        if isinstance(thread, str):
            fields["thread"] = hash_id(thread)
    started = g.get("chatkit_started")
    if started is not None:
        fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return fields


# Where a reply's time went, each from the request's start in Flask (the log line's fields):
# identity and limits done, first frame out, model called (history read, budget reserved), the
# model's first delta received, the first answer frame made from it.
STREAM_PHASES = (
    ("view_at", "admitted_ms"),
    ("first_frame_at", "ttfe_ms"),
    ("model_called_at", "model_called_ms"),
    ("model_delta_at", "model_delta_ms"),
    ("first_answer_at", "first_answer_ms"),
)


def _log_stream(fields: dict[str, Any], context: RequestContext, started: float) -> None:
    report = context.report
    fields["outcome"] = stream_outcome(report)
    if report.get("store_failed"):
        fields["cause"] = "store"
    if report.get("refused_scope"):
        fields["scope"] = report["refused_scope"]
    usage = report.get("usage")
    if usage is not None:
        fields["tokens_in"] = usage.input_tokens
        fields["tokens_out"] = usage.output_tokens
    if report.get("received_at") is not None:  # under the ASGI worker: waiting for a thread
        fields["queued_ms"] = round((started - report["received_at"]) * 1000, 1)
    for key, name in STREAM_PHASES:
        if report.get(key) is not None:
            fields[name] = round((report[key] - started) * 1000, 1)
    fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    log_message(fields)
