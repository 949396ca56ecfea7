"""The thin HTTP layer: request -> identity -> limits -> upstream -> response."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask_limiter import RateLimitExceeded
from limits.errors import StorageError
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from .errors import ApiError, error_response, http_error_response
from .identity import client_address, client_network, user_identity
from .limits import guard_header_hook, limit_rules, limited, retry_after, storage_of
from .logs import log_mint
from .upstream import (
    CircuitOpen,
    UpstreamBusy,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from .state import ChatKitState

__all__ = ["BLUEPRINT_NAME", "MAX_BODY_BYTES", "health_blueprint", "make_blueprint"]

BLUEPRINT_NAME = "chatkit"

MAX_BODY_BYTES = 16 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_LIMIT_MESSAGES = {
    "user": "You have started too many chat sessions",
    "ip": "Too many chat sessions were started from your network",
    "global": "The chat is very busy right now",
    "site": "Too many requests",
}


def _workflow_field(body: dict[str, Any]) -> str | None:
    """The workflow id the body asks for, from any shape frontends send today, or None."""
    asked: set[str] = set()
    for key in ("workflow_id", "workflowId"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise ApiError(400, "invalid_request", f"'{key}' must be a string.")
        if value:
            asked.add(value)
    workflow = body.get("workflow")
    if workflow is not None:
        if not isinstance(workflow, dict):
            raise ApiError(400, "invalid_request", "'workflow' must be an object.")
        value = workflow.get("id")
        if value is not None and not isinstance(value, str):
            raise ApiError(400, "invalid_request", "'workflow.id' must be a string.")
        if value:
            asked.add(value)
    if len(asked) > 1:
        raise ApiError(400, "invalid_request", "The body names more than one workflow.")
    return asked.pop() if asked else None


def _read_body() -> dict[str, Any]:
    request.max_content_length = MAX_BODY_BYTES  # per request: the host app's limit is untouched
    data = request.get_data(cache=True)
    if not data.strip():
        return {}
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "The request body must be application/json.")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        raise ApiError(400, "invalid_request", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "The request body must be a JSON object.")
    return body


def _check_origin(state: ChatKitState, scheme: str) -> None:
    """Browsers on other sites may not mint. Without an allowlist only same-site pages may."""
    origin = request.headers.get("Origin")
    fetch_site = request.headers.get("Sec-Fetch-Site")
    allowed = state.settings.allowed_origins
    if not allowed:
        if fetch_site == "cross-site":
            raise ApiError(403, "origin_not_allowed", "This origin may not use the chat.")
        return
    if origin is None or origin in allowed or fetch_site == "same-origin":
        return
    if origin == f"{scheme}://{request.host}":
        return
    raise ApiError(403, "origin_not_allowed", "This origin may not use the chat.")


def make_blueprint(state: ChatKitState) -> Blueprint:
    """The ``chatkit`` blueprint: ``POST {prefix}/secret`` and the frontend helper's files."""
    settings = state.settings
    limiter = state.limiter
    bp = Blueprint(
        BLUEPRINT_NAME,
        __name__,
        url_prefix=settings.url_prefix,
        static_folder="static",
        static_url_path="/static",
    )
    header_hook = {"guarded": False}

    @bp.before_request
    def prepare() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.chatkit_request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        g.chatkit_started = time.perf_counter()
        if not header_hook["guarded"]:  # a host limiter initialised after the extension
            header_hook["guarded"] = guard_header_hook(current_app, limiter)
        if request.endpoint != "chatkit.secret":
            return
        remote_addr, scheme = client_address(request.environ, settings)
        _check_origin(state, scheme)
        if request.method != "POST":
            return
        body = _read_body()
        workflow = _workflow_field(body) or settings.workflow_id
        if workflow not in settings.allowed_workflows:
            raise ApiError(403, "workflow_not_allowed", "This workflow is not allowed.")
        g.chatkit_workflow = workflow
        g.chatkit_client_network = client_network(remote_addr, settings.ipv6_prefix)
        user = user_identity(state.load_user())
        g.chatkit_identity = user or state.cookie.resolve(request.cookies.get(settings.cookie_name))

    def secret() -> Response:
        """Mint a client secret for the visitor."""
        if request.method != "POST":
            raise ApiError(405, "method_not_allowed", "Use POST.", headers={"Allow": "POST"})
        identity = g.chatkit_identity
        try:
            session = state.client.create_session(
                workflow_id=g.chatkit_workflow,
                user=identity.user,
                ttl=settings.session_ttl,
                workflow_version=settings.workflow_version,
                rate_limit=settings.session_rate_limit,
                chatkit_configuration=settings.chatkit_configuration,
            )
        except UpstreamError as exc:
            g.chatkit_upstream = exc
            raise _upstream_api_error(exc) from None
        g.chatkit_upstream = session
        g.chatkit_outcome = "minted"
        now = int(time.time())
        response = jsonify(
            client_secret=session.client_secret,
            expires_at=session.expires_at,
            expires_after=max(session.expires_at - now, 0),
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    bp.add_url_rule(
        "/secret",
        "secret",
        limited(secret, limiter, limit_rules(settings)),
        methods=_ALL_METHODS,
    )

    @bp.after_request
    def finish(response: Response) -> Response:
        request_id = getattr(g, "chatkit_request_id", None)
        if request_id:
            response.headers["X-Request-ID"] = request_id
        if request.endpoint != "chatkit.secret":
            return response
        response.headers["Cache-Control"] = "no-store"
        identity = getattr(g, "chatkit_identity", None)
        if identity is not None and identity.new_cookie:
            response.set_cookie(
                settings.cookie_name,
                identity.new_cookie,
                max_age=settings.cookie_max_age,
                path="/",
                secure=settings.cookie_secure,
                httponly=True,
                samesite="Lax",
            )
        if request.method == "POST":
            for hook in state.response_hooks:
                hook(response)
            _log(response, identity)
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
        return error_response(
            ApiError(
                429,
                "rate_limited",
                f"{_LIMIT_MESSAGES[scope]}. Try again in {wait} seconds.",
                headers={"Retry-After": str(wait)},
                extra={"retry_after": wait, "scope": scope},
            )
        )

    def on_storage_error(exc: Exception) -> Response:
        # Flask-Limiter re-raises storage failures unless its in-memory fallback or
        # RATELIMIT_SWALLOW_ERRORS is on: fail closed, before anything goes upstream.
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

    return bp


def _upstream_api_error(exc: UpstreamError) -> ApiError:
    if isinstance(exc, UpstreamBusy | CircuitOpen):
        code, message = (
            ("upstream_busy", "The chat service is busy. Try again shortly.")
            if isinstance(exc, UpstreamBusy)
            else ("upstream_unavailable", "The chat service is unavailable. Try again shortly.")
        )
        return ApiError(
            503,
            code,
            message,
            headers={"Retry-After": str(exc.retry_after)},
            extra={"retry_after": exc.retry_after},
        )
    if isinstance(exc, UpstreamTimeout):
        return ApiError(504, "upstream_timeout", "The chat service did not answer in time.")
    if isinstance(exc, UpstreamRejected):
        return ApiError(502, "upstream_error", "The chat service refused this site's request.")
    return ApiError(502, "upstream_error", "The chat service is unavailable.")


def _log(response: Response, identity: Any) -> None:
    upstream = getattr(g, "chatkit_upstream", None)
    started = getattr(g, "chatkit_started", None)
    fields: dict[str, Any] = {
        "request_id": getattr(g, "chatkit_request_id", "-"),
        "outcome": getattr(g, "chatkit_outcome", None) or f"http_{response.status_code}",
        "status": response.status_code,
        "visitor": identity.log_id if identity is not None else "-",
        "ip": getattr(g, "chatkit_client_network", None) or request.remote_addr or "-",
        "workflow": getattr(g, "chatkit_workflow", "-"),
    }
    scope = getattr(g, "chatkit_limit_scope", None)
    if scope:
        fields["scope"] = scope
    if upstream is not None:
        fields["upstream_status"] = upstream.status if upstream.status is not None else "-"
        fields["upstream_ms"] = round(upstream.latency_ms, 1)
        fields["upstream_request_id"] = upstream.request_id or "-"
        fields["attempts"] = upstream.attempts
        if isinstance(upstream, UpstreamError):
            fields["error"] = str(upstream)
            if upstream.detail:
                fields["upstream_detail"] = upstream.detail
    if started is not None:
        fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    log_mint(fields)


def health_blueprint(state: ChatKitState) -> Blueprint:
    """``GET /healthz`` (alive; touches nothing) and ``GET /readyz`` (limiter storage answers)."""
    bp = Blueprint("chatkit_health", __name__)

    @bp.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @bp.get("/readyz")
    def readyz() -> Response | tuple[Response, int]:
        storage = storage_of(state.limiter)
        if storage is None:
            return jsonify(status="ready", storage="limits disabled")
        if not storage.check():
            return jsonify(status="not_ready", storage="unreachable"), 503
        return jsonify(status="ready", storage="ok")

    state.exempt(bp)
    return bp
