"""What both backends' blueprints share: request ids, the origin check, the JSON body, the caller's
identity and cookie, the JSON error handlers and the health endpoints."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask_limiter import RateLimitExceeded
from limits.errors import StorageError
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from .errors import ApiError, error_response, http_error_response
from .identity import (
    Identity,
    client_address,
    client_network,
    cookie_values,
    ipv6_network,
    user_identity,
    visitor_cookie_name,
)
from .limits import IPV6_AGGREGATE_PREFIX, guard_header_hook, retry_after, storage_of

if TYPE_CHECKING:
    from .settings import Settings
    from .state import ChatKitState

__all__ = [
    "BLUEPRINT_NAME",
    "begin_request",
    "current_visitor",
    "health_blueprint",
    "read_json_body",
    "register_error_handlers",
    "resolve_caller",
    "set_visitor_cookie",
]

BLUEPRINT_NAME = "chatkit"
log = logging.getLogger("chatkit_flask")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# What a 429 says, per scope of the refusing limit (each backend names what it counts).
LimitMessages = dict[str, str]


def new_blueprint(state: ChatKitState) -> Blueprint:
    """The ``chatkit`` blueprint under the prefix, with the frontend helper's static files."""
    return Blueprint(
        BLUEPRINT_NAME,
        __name__,
        url_prefix=state.settings.url_prefix,
        static_folder="static",
        static_url_path="/static",
    )


def begin_request(state: ChatKitState, guard: dict[str, bool]) -> None:
    """Every request of the blueprint: an ``X-Request-ID`` (kept when valid) and a start time.
    ``guard`` remembers whether a host limiter's header hook has been made fallback-safe."""
    incoming = request.headers.get("X-Request-ID", "")
    g.chatkit_request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    g.chatkit_started = time.perf_counter()
    if not guard["done"]:  # a host limiter initialised after the extension
        guard["done"] = guard_header_hook(current_app, state.limiter)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _normalized_origin(value: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port, or None if not an origin
    (``null``, garbage)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    return f"{scheme}://{host}"


def check_origin(state: ChatKitState, scheme: str) -> None:
    """Browsers on other sites may not call the chat.

    An ``Origin`` must be the site's own (``scheme`` is the one the client used, behind trusted
    proxies too) or listed in ``CHATKIT_ALLOWED_ORIGINS``, whatever ``Sec-Fetch-Site`` says or
    whether it is sent at all; a browser's ``Sec-Fetch-Site: same-origin`` counts as the site's
    own. ``Sec-Fetch-Site: cross-site`` is refused unless the ``Origin`` is listed. A request
    with neither header (server to server, curl) passes.
    """
    origin = request.headers.get("Origin")
    fetch_site = request.headers.get("Sec-Fetch-Site")
    given = _normalized_origin(origin) if origin is not None else None
    allowed = {_normalized_origin(item) for item in state.settings.allowed_origins}
    if given is not None and given in allowed:
        return
    if fetch_site == "cross-site":  # and not from a listed origin
        raise ApiError(403, "origin_not_allowed", "This origin may not use the chat.")
    if origin is None or fetch_site == "same-origin":
        return
    if given is None or given != _normalized_origin(f"{scheme}://{request.host}"):
        raise ApiError(403, "origin_not_allowed", "This origin may not use the chat.")


def read_json_body(max_bytes: int, *, allow_empty: bool) -> tuple[bytes, Any]:
    """The raw body and its parsed JSON (``{}`` when empty and ``allow_empty``), or ApiError."""
    if request.mimetype != "application/json":
        # Even when empty: an HTML form (or a "simple" cross-site fetch) cannot send this type.
        raise ApiError(415, "unsupported_media_type", "The request body must be application/json.")
    unterminated = "wsgi.input_terminated" not in request.environ
    if unterminated and "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        # A server that does not de-chunk: werkzeug would read the body as empty.
        raise ApiError(400, "invalid_request", "Send the request body with Content-Length.")
    # werkzeug enforces max_content_length on a chunked body by cutting the stream at the
    # limit, without an error: let it read one byte past the cap and refuse what reaches it.
    request.max_content_length = max_bytes + 1  # per request: the host app's limit is untouched
    data = request.get_data(cache=True)
    if len(data) > max_bytes:
        raise ApiError(413, "payload_too_large", "The request body is too large.")
    if not data.strip():
        if allow_empty:
            return data, {}
        raise ApiError(400, "invalid_request", "The request body is empty.")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        raise ApiError(400, "invalid_request", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "The request body must be a JSON object.")
    return data, body


def resolve_caller(state: ChatKitState) -> Identity:
    """Origin check, client network and identity of the current request, kept on ``g``."""
    settings = state.settings
    remote_addr, scheme = client_address(request.environ, settings)
    check_origin(state, scheme)
    g.chatkit_client_network = client_network(remote_addr, settings.ipv6_prefix)
    g.chatkit_ipv6_aggregate = ipv6_network(remote_addr, IPV6_AGGREGATE_PREFIX)
    identity = user_identity(state.load_user()) or state.cookie.resolve(_visitor_cookie(settings))
    g.chatkit_identity = identity
    return identity


def current_visitor(state: ChatKitState) -> Identity | None:
    """The anonymous visitor the request's cookie names, or None when it carries no valid one
    (nothing is issued: for log-in and log-out, outside the chat's routes)."""
    visitor_id, _ = state.cookie.verify(_visitor_cookie(state.settings))
    return None if visitor_id is None else state.cookie.identity(visitor_id)


def _visitor_cookie(settings: Settings) -> str | None:
    """The visitor cookie's value, or None when there is none or more than one: a duplicate is
    a cookie planted from elsewhere (another subdomain, another path), and the order a browser
    sends them in says nothing about which one is ours."""
    name = visitor_cookie_name(settings.cookie_name, settings.cookie_secure)
    values = cookie_values(";".join(request.headers.getlist("Cookie")), name)
    if len(values) > 1:
        log.warning(
            "chatkit_flask: %d cookies named %s in one request (planted from another "
            "subdomain or path?); none is trusted, the caller is a new visitor",
            len(values),
            name,
        )
        return None
    return values[0] if values else None


def set_visitor_cookie(state: ChatKitState, response: Response) -> None:
    """Issue (or re-sign) the visitor cookie when the identity asked for it."""
    identity = g.get("chatkit_identity")
    if identity is None or not identity.new_cookie:
        return
    settings = state.settings
    response.set_cookie(
        visitor_cookie_name(settings.cookie_name, settings.cookie_secure),
        identity.new_cookie,
        max_age=settings.cookie_max_age,
        path="/",
        secure=settings.cookie_secure,
        httponly=True,
        samesite="Lax",
    )


def register_error_handlers(
    bp: Blueprint,
    state: ChatKitState,
    messages: LimitMessages,
    render_refusal: Callable[[ApiError], Response] = error_response,
) -> None:
    """Every failure of the blueprint as ``{"error", "message", "request_id", ...}`` JSON;
    ``messages`` words the 429 of each limit scope, ``render_refusal`` answers it (server mode
    answers a refused message inside an event stream)."""
    limiter = state.limiter

    @bp.after_request
    def tag(response: Response) -> Response:
        request_id = g.get("chatkit_request_id")
        if request_id:
            response.headers["X-Request-ID"] = request_id
        if state.settings.allowed_origins:  # the answer (CORS headers, 403) depends on Origin
            response.vary.add("Origin")
        return response

    @bp.errorhandler(ApiError)
    def on_api_error(exc: ApiError) -> Response:
        return error_response(exc)

    @bp.errorhandler(RateLimitExceeded)
    def on_rate_limited(exc: RateLimitExceeded) -> Response:
        if exc.response is not None:  # the host's on_breach answered
            return exc.response
        scope = g.get("chatkit_limit_scope") or "site"
        g.chatkit_limit_scope = scope
        wait = retry_after(limiter)
        return render_refusal(
            ApiError(
                429,
                "rate_limited",
                f"{messages.get(scope, 'Too many requests')}. Try again in {wait} seconds.",
                headers={"Retry-After": str(wait)},
                extra={"retry_after": wait, "scope": scope},
            )
        )

    def on_storage_error(exc: Exception) -> Response:
        # Flask-Limiter re-raises storage failures unless its in-memory fallback or
        # RATELIMIT_SWALLOW_ERRORS is on: fail closed, before anything reaches the backend.
        current_app.logger.error("chatkit_flask: rate limit storage failed: %s", type(exc).__name__)
        g.chatkit_storage_failed = True
        return error_response(
            ApiError(
                503,
                "limiter_unavailable",
                "The chat is temporarily unavailable. Try again shortly.",
                headers={"Retry-After": "5"},
            )
        )

    bp.register_error_handler(RedisError, on_storage_error)
    bp.register_error_handler(StorageError, on_storage_error)

    @bp.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException) -> Response:
        return http_error_response(exc)


def health_blueprint(state: ChatKitState) -> Blueprint:
    """``GET /healthz`` (alive; touches nothing) and ``GET /readyz`` (the limiter storage and,
    in server mode, the thread store answer; 503 naming the failing part otherwise)."""
    bp = Blueprint("chatkit_health", __name__)

    @bp.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @bp.get("/readyz")
    def readyz() -> Response | tuple[Response, int]:
        report: dict[str, Any] = {"status": "ready"}
        failing: list[str] = []
        storage = storage_of(state.limiter)
        if storage is None:
            report["storage"] = "limits disabled"
        elif _answers(storage.check):
            report["storage"] = "ok"
        else:
            report["storage"] = "unreachable"
            failing.append("storage")
        for name, check in state.ready_checks.items():
            try:
                problem = check()
            except Exception:  # a probe that breaks is a part that is not ready
                log.exception("chatkit_flask: readiness check %s failed", name)
                problem = "error"
            report[name] = problem or "ok"
            if problem:
                failing.append(name)
        if failing:
            report.update(status="not_ready", failing=failing)
            return jsonify(report), 503
        return jsonify(report)

    state.exempt(bp)
    return bp


def _answers(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        return False
