"""The standalone service: an app factory that reads ``config/`` and the environment."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from .errors import http_error_response
from .extension import ChatKit
from .logs import configure_logging
from .settings import Settings, load_config
from .web import health_blueprint

__all__ = ["DEFAULT_CONFIG_FILE", "create_app"]

DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent / "config" / "chatkit.toml"


def create_app(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Flask:
    """Build the service app: config file (``CHATKIT_CONFIG_FILE``, default ``config/chatkit.toml``)
    < environment variables < ``overrides``. Raises ``ConfigError`` naming the bad key."""
    environ = os.environ if environ is None else environ
    path = environ.get("CHATKIT_CONFIG_FILE") or (
        DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None
    )
    config = load_config(path, environ)
    config.update(overrides or {})
    if str(config.get("CHATKIT_METRICS_ENABLED", "")).strip() == "":
        config["CHATKIT_METRICS_ENABLED"] = True  # the service serves /metrics unless told not to
    settings = Settings.from_mapping(config)  # fail fast, before anything is wired
    configure_logging(settings.log_level, settings.log_format)

    app = Flask("chatkit_flask")
    app.config.update(config)
    app.config["SECRET_KEY_FALLBACKS"] = list(settings.secret_key_fallbacks)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    chatkit = ChatKit(app)
    state = chatkit.state(app)
    app.register_blueprint(health_blueprint(state))
    prefix = state.settings.url_prefix + "/"

    @app.errorhandler(HTTPException)
    def routing_error(exc: HTTPException) -> Response | HTTPException:
        # Routing errors (an unknown method such as TRACE, an unknown path under the prefix)
        # happen before the blueprint's handlers can apply: answer them in the same JSON shape.
        if not request.path.startswith(prefix):
            return exc
        g.chatkit_request_id = g.get("chatkit_request_id") or uuid.uuid4().hex
        response = http_error_response(exc)
        response.headers["X-Request-ID"] = g.chatkit_request_id
        return response

    if state.settings.demo:
        from .demo import demo_blueprint

        app.register_blueprint(demo_blueprint(state))
    return app
