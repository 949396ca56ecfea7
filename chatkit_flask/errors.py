"""One JSON error shape for every failure the endpoint gives."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Response, g, jsonify
from werkzeug.exceptions import HTTPException

__all__ = ["ApiError", "error_response", "http_error_response"]

# Codes for the HTTP errors werkzeug raises on our routes; messages never echo the request.
_HTTP_CODES = {
    400: ("invalid_request", "The request is not valid."),
    404: ("not_found", "No such endpoint."),
    405: ("method_not_allowed", "Use POST."),
    413: ("payload_too_large", "The request body is too large."),
    415: ("unsupported_media_type", "The request body must be application/json."),
    429: ("rate_limited", "Too many requests."),
    500: ("internal_error", "Something went wrong on our side."),
}


class ApiError(Exception):
    """An error the endpoint answers with: HTTP status, stable code and a human message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}


def error_response(error: ApiError) -> Response:
    """Render ``error`` as ``{"error", "message", "request_id", ...}`` with its status."""
    g.chatkit_outcome = getattr(g, "chatkit_outcome", None) or error.code
    body = {"error": error.code, "message": error.message, **error.extra}
    # An app-level hook (CSRF, the host's limiter) can fail a request before the blueprint
    # gives it an id: every error body still carries one.
    if not getattr(g, "chatkit_request_id", None):
        g.chatkit_request_id = uuid.uuid4().hex
    body["request_id"] = g.chatkit_request_id
    response = jsonify(body)
    response.status_code = error.status
    response.headers["Cache-Control"] = "no-store"
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def http_error_response(exc: HTTPException) -> Response:
    """Render a werkzeug HTTP error (405, 413, ...) in the same JSON shape."""
    status = exc.code or 500
    code, message = _HTTP_CODES.get(status, ("http_error", "The request failed."))
    if type(exc).__name__ == "CSRFError":  # Flask-WTF's CSRFProtect ran on the chat's endpoint
        code, message = (
            "csrf_failed",
            "The site's CSRF protection refused this request: the site must exempt the chat "
            "blueprint (csrf.exempt(app.blueprints['chatkit'])); the chat checks Origin itself.",
        )
    headers = {}
    if status == 405:
        headers["Allow"] = "POST, OPTIONS"
    return error_response(ApiError(status, code, message, headers=headers))
