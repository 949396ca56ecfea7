"""Hosted backend: ``POST {prefix}/secret`` mints a ChatKit client secret for an Agent Builder
workflow (request -> identity -> limits -> upstream -> response); ``GET {prefix}/config`` tells
the page which backend runs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, g, jsonify, request, url_for

from .errors import ApiError
from .limits import limit_rules, limited
from .logs import log_mint
from .upstream import (
    CircuitOpen,
    UpstreamBusy,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from .web import (
    begin_request,
    new_blueprint,
    read_json_body,
    register_error_handlers,
    resolve_caller,
    set_visitor_cookie,
)

if TYPE_CHECKING:
    from .state import ChatKitState

__all__ = ["MAX_BODY_BYTES", "make_hosted_blueprint"]

MAX_BODY_BYTES = 16 * 1024
ENDPOINT = "chatkit.secret"
CONFIG_ENDPOINT = "chatkit.config"
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_LIMIT_MESSAGES = {
    "user": "You have started too many chat sessions",
    "ip": "Too many chat sessions were started from your network",
    "net48": "Too many chat sessions were started from your network",
    "global": "The chat is very busy right now",
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


def make_hosted_blueprint(state: ChatKitState) -> Blueprint:
    """The ``chatkit`` blueprint of the hosted backend: ``POST {prefix}/secret`` and ``GET
    {prefix}/config``."""
    settings = state.settings
    bp = new_blueprint(state)
    guard = {"done": False}
    state.limit_endpoint, state.limit_rules = ENDPOINT, limit_rules(settings)

    @bp.before_request
    def prepare() -> None:
        begin_request(state, guard)
        if request.endpoint not in (ENDPOINT, CONFIG_ENDPOINT) or request.method == "OPTIONS":
            return  # a CORS preflight is answered without an identity (and sets no cookie)
        resolve_caller(state)
        if request.endpoint != ENDPOINT or request.method != "POST":
            return
        _, body = read_json_body(MAX_BODY_BYTES, allow_empty=True)
        workflow = _workflow_field(body) or settings.workflow_id
        if workflow not in settings.allowed_workflows:
            raise ApiError(403, "workflow_not_allowed", "This workflow is not allowed.")
        g.chatkit_workflow = workflow

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
        limited(secret, state.limiter, state.limit_rules),
        methods=_ALL_METHODS,
    )

    @bp.get("/config")
    def config() -> Response:
        """What the page needs to configure chatkit-js (the same answer shape in both backends,
        so the served helper works with either); issues the visitor cookie like the server
        backend's."""
        return jsonify(backend="hosted", secretUrl=url_for(ENDPOINT))

    @bp.after_request
    def finish(response: Response) -> Response:
        if request.endpoint not in (ENDPOINT, CONFIG_ENDPOINT):
            return response
        response.headers["Cache-Control"] = "no-store"
        set_visitor_cookie(state, response)
        if request.endpoint == ENDPOINT and request.method == "POST":
            for hook in state.response_hooks:
                hook(response)
            _log(response)
        return response

    register_error_handlers(bp, state, _LIMIT_MESSAGES)
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


def _log(response: Response) -> None:
    identity = g.get("chatkit_identity")
    upstream = g.get("chatkit_upstream")
    started = g.get("chatkit_started")
    fields: dict[str, Any] = {
        "request_id": g.get("chatkit_request_id", "-"),
        "outcome": g.get("chatkit_outcome") or f"http_{response.status_code}",
        "status": response.status_code,
        "visitor": identity.log_id if identity is not None else "-",
        "ip": g.get("chatkit_client_network") or request.remote_addr or "-",
        "workflow": g.get("chatkit_workflow", "-"),
    }
    scope = g.get("chatkit_limit_scope")
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
