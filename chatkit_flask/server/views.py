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
from .context import RequestContext
from .endpoint import RESTART_MESSAGE, STREAM_HEADERS, handle, stream_outcome
from .protocol import NotFoundError, RequestRefused, calls_model, streams
from .runtime import BUDGET_MESSAGES, ServerRuntime
from .slots import Slot

if TYPE_CHECKING:
    from ..state import ChatKitState

__all__ = ["create_runtime", "make_server_blueprint"]

ENDPOINT = "chatkit.chatkit"
CONFIG_ENDPOINT = "chatkit.config"
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
) -> ServerRuntime:
    """Build server mode's parts (raises ``ConfigError`` naming the key); ``limiter`` gives
    the limiter once it exists (the stream slots count in its storage); the site's agent code
    runs inside app contexts of ``app``, whose instance folder holds the default thread store
    and ``@file`` instructions; ``actions`` are the site's widget-action handlers by name."""
    return ServerRuntime(settings, lambda: active_storage(limiter()), app, actions)


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
    max_body = max(64 * 1024, settings.max_input_chars * 4 + 32 * 1024)

    def acceptable(raw: bytes) -> bool:
        """Whether the server will take this body (cheap: one cached pydantic adapter)."""
        try:
            runtime.server.parse(raw)
        except (RequestRefused, NotFoundError):
            return False
        return True

    @bp.before_request
    def prepare() -> None:
        begin_request(state, guard)
        if request.endpoint not in (ENDPOINT, CONFIG_ENDPOINT) or request.method == "OPTIONS":
            return  # a CORS preflight is answered without an identity (and sets no cookie)
        resolve_caller(state)
        if request.endpoint != ENDPOINT or request.method != "POST":
            return
        raw, body = read_json_body(max_body, allow_empty=False)
        kind = body.get("type")
        g.chatkit_request_type = kind if isinstance(kind, str) else None
        # Only a message the server will take counts against the message limits; one it refuses
        # with a 400 (too long, malformed, attachments) falls under the requests limit alone.
        g.chatkit_is_message = calls_model(g.chatkit_request_type) and acceptable(raw)
        g.chatkit_body = raw
        # The thread a message answers in (threads.create makes a new one): one reply at a time.
        params = body.get("params")
        thread_id = params.get("thread_id") if isinstance(params, dict) else None
        g.chatkit_thread_id = thread_id if isinstance(thread_id, str) else None

    def chatkit() -> Response:
        """One ChatKit request for the caller."""
        if request.method != "POST":
            raise ApiError(405, "method_not_allowed", "Use POST.", headers={"Allow": "POST"})
        identity = g.chatkit_identity
        context = RequestContext(
            owner=identity.limit_key,
            request_id=g.chatkit_request_id,
            client_network=g.get("chatkit_client_network", "-"),
            user_id=identity.user_id,
            locale=request.accept_languages.best,
        )
        g.chatkit_context = context
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
        try:
            response = handle(
                runtime.server,
                runtime.bridge,
                g.chatkit_body,
                context,
                timeout=settings.model_timeout,
                heartbeat=HEARTBEAT_SECONDS,
                write_timeout=settings.stream_write_timeout,
                on_stall=_socket_shutdown(request.environ),
            )
        except BaseException:
            for hold in holds:
                hold.release()
            raise
        started = g.chatkit_started
        fields = _log_fields(response)
        for hold in holds:
            if response.is_streamed:
                response.response = hold.hold(response.response)
            else:  # an answer decided before any stream: nothing to hold
                hold.release()
        if response.mimetype == "text/event-stream":
            g.chatkit_outcome = "streamed"
            # The line is written when the stream ends, however it ends.
            response.call_on_close(lambda: _log_stream(fields, context, started))
        else:
            g.chatkit_outcome = "answered"
        return response

    state.limit_endpoint, state.limit_rules = ENDPOINT, _rules(state)
    bp.add_url_rule(
        "", "chatkit", limited(chatkit, state.limiter, state.limit_rules), methods=["GET", "POST"]
    )

    @bp.get("/config")
    def config() -> Response:
        """What the page needs to configure chatkit-js; issues the visitor cookie first, so the
        widget's first parallel requests agree on who the visitor is."""
        response = jsonify(
            backend="server",
            url=url_for(ENDPOINT),
            domainKey=settings.domain_key or DOMAIN_KEY_PLACEHOLDER,
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
    for key, name in (("first_frame_at", "ttfe_ms"), ("first_answer_at", "first_answer_ms")):
        if report.get(key) is not None:
            fields[name] = round((report[key] - started) * 1000, 1)
    fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    log_message(fields)
