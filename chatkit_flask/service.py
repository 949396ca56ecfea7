"""The standalone service: an app factory that reads ``config/`` and the environment."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from flask.helpers import get_load_dotenv
from werkzeug.exceptions import HTTPException

from .errors import http_error_response
from .extension import ChatKit
from .logs import configure_logging, held_records, replay
from .metrics_dir import adopt_gunicorn_metrics_dir
from .settings import Settings, load_config, read_env_file
from .web import health_blueprint

__all__ = ["DEFAULT_CONFIG_FILE", "DEFAULT_ENV_FILE", "create_app", "service_config"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "config" / "chatkit.toml"
DEFAULT_ENV_FILE = PROJECT_ROOT / ".env"
# The service's instance folder in a checkout or the image (the default thread store goes there);
# an installed package has no var/ beside it and gets Flask's default instance folder.
SERVICE_INSTANCE_DIR = PROJECT_ROOT / "var"


def service_config(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The service's configuration: config file (``CHATKIT_CONFIG_FILE``, default
    ``config/chatkit.toml``) < ``.env`` < environment variables < ``overrides``.

    ``.env`` is ``CHATKIT_ENV_FILE`` if set, else the project root's ``.env`` when ``environ``
    is the process environment (None); an explicit ``environ`` reads no file it does not name.
    Under Flask's CLI the variables it loaded from its own ``.env``/``.flaskenv`` do not count as
    environment, so ``flask chatkit ...`` sees what gunicorn sees. Not validated: pass the
    result to ``Settings.from_mapping``.
    """
    process = environ is None
    environ = _without_flask_cli_dotenv() if environ is None else environ
    env_file: Path | str | None = environ.get("CHATKIT_ENV_FILE") or None
    if env_file is None and process and DEFAULT_ENV_FILE.is_file():
        env_file = DEFAULT_ENV_FILE
    # CHATKIT_CONFIG_FILE itself may be set in .env.
    lookup = {**read_env_file(env_file), **environ} if env_file is not None else environ
    path = lookup.get("CHATKIT_CONFIG_FILE") or (
        DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None
    )
    config = load_config(path, environ, env_file)
    config.update(overrides or {})
    if str(config.get("CHATKIT_METRICS_ENABLED", "")).strip() == "":
        config["CHATKIT_METRICS_ENABLED"] = True  # the service serves /metrics unless told not to
    return config


def _without_flask_cli_dotenv() -> dict[str, str]:
    """The process environment minus what Flask's CLI added from dotenv files.

    Before it imports the app, ``flask`` loads ``.flaskenv`` and ``.env`` found from its working
    directory upward into ``os.environ`` (unless FLASK_SKIP_DOTENV), expanding ``${...}``. Taken
    as environment, those would beat CHATKIT_ENV_FILE and differ from what gunicorn reads; the
    service reads one file with one parser instead. A variable whose value is exactly what
    Flask's files hold is dropped: one the real environment also held with that very value
    cannot be told apart (the only case where the CLI may still differ from gunicorn).
    """
    environ = dict(os.environ)
    if environ.get("FLASK_RUN_FROM_CLI") != "true" or not get_load_dotenv():
        return environ
    from dotenv import dotenv_values, find_dotenv

    loaded: dict[str, str | None] = {}
    for name in (".flaskenv", ".env"):  # Flask's order: .env wins
        path = find_dotenv(name, usecwd=True)
        if path:
            loaded |= dotenv_values(path, encoding="utf-8")
    return {key: value for key, value in environ.items() if loaded.get(key) != value}


def create_app(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Flask:
    """Build the service app from ``service_config(overrides, environ)``. Raises
    ``ConfigError`` naming the bad key."""
    with held_records() as held:  # warnings about the settings, in the format they choose
        config = service_config(overrides, environ)
        settings = Settings.from_mapping(config)  # fail fast, before anything is wired
    if settings.metrics_enabled:
        # Under a gunicorn started without our config: summed metrics anyway (before
        # ChatKit(app) imports prometheus-client).
        adopt_gunicorn_metrics_dir()
    configure_logging(settings.log_level, settings.log_format)
    replay(held)

    instance = SERVICE_INSTANCE_DIR if SERVICE_INSTANCE_DIR.is_dir() else None
    app = Flask("chatkit_flask", instance_path=str(instance) if instance else None)
    app.config.update(config)
    app.config["SECRET_KEY_FALLBACKS"] = list(settings.secret_key_fallbacks)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    chatkit = ChatKit()
    if settings.demo and settings.backend == "server" and not settings.agent:
        # The demo agent's card (server/demo_site.py): its action registered before init_app,
        # which then gives the plain agent the card's tool.
        from .server.demo_site import register_demo_actions

        register_demo_actions(chatkit)
    chatkit.init_app(app)
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
