"""The ``ChatKit`` Flask extension: ``ChatKit(app)`` or ``chatkit.init_app(app)``."""

from __future__ import annotations

import inspect
import logging
import re
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, current_app
from flask_cors import CORS
from flask_limiter import ExemptionScope, Limiter

from .cli import chatkit_cli
from .hosted import make_hosted_blueprint
from .identity import VisitorCookie
from .limits import guard_header_hook, prepare_limiter
from .logs import init_app_logging
from .settings import OPTIONS, ConfigError, Settings, _read
from .state import ChatKitState, RegisteredAction
from .upstream import ChatKitClient
from .visitors import adopt_visitor_threads, connect_flask_login, forget_visitor
from .web import BLUEPRINT_NAME

__all__ = ["ChatKit", "ChatKitState"]

log = logging.getLogger("chatkit_flask")

UserLoader = Callable[[], Any]
Handler = TypeVar("Handler", bound=Callable[..., Any])

# Flask-Limiter reads these from app.config itself; they are written back typed, so that the
# string "false" from an environment variable means false to it too.
_LIMITER_KEYS = tuple(name for name in OPTIONS if name.startswith("RATELIMIT_"))


class ChatKit:
    """Serves the ChatKit endpoint under ``CHATKIT_URL_PREFIX`` (hosted mode: ``POST
    {prefix}/secret`` mints client secrets).

    ``limiter``: a ``flask_limiter.Limiter`` the host app runs, in any state (initialised on the
    app before or after this extension, enabled or not); the chat's limits are declared on it.
    By default the extension builds its own from the ``RATELIMIT_*`` keys.
    ``client``: a ``ChatKitClient`` to use instead of one built from the settings.
    ``store_engine``: server mode keeps threads in the host's own database: Flask-SQLAlchemy's
    ``db`` (its default engine, or the bind ``CHATKIT_STORE_BIND``), a SQLAlchemy engine or a
    URL. The store makes its own async engine on that database (tables under
    ``CHATKIT_STORE_TABLE_PREFIX``, made by ``flask chatkit db upgrade``).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        limiter: Limiter | None = None,
        client: ChatKitClient | None = None,
        store_engine: Any = None,
    ) -> None:
        self._limiter = limiter
        self._client = client
        self._store_engine = store_engine
        self._user_loader: UserLoader | None = None
        # Shared with every app's server: handlers registered after init_app count too.
        self._actions: dict[str, RegisteredAction] = {}
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def user_loader(self, func: UserLoader) -> UserLoader:
        """Register ``func() -> user id or None``. A non-empty ``str`` or ``int`` id makes the
        request that signed-in user's (ChatKit ``user`` and per-user limit key); anything else
        means the anonymous visitor cookie."""
        self._user_loader = func
        return func

    def action(self, name: str, *, sync: bool = False) -> Callable[[Handler], Handler]:
        """Register the handler of the widget action ``name`` (server mode).

        ``async def handler(ctx)`` receives an ``ActionContext`` (``thread``, ``action``,
        ``payload``, ``sender`` widget, request ``context``). By default it is an async generator
        of ChatKit events (``threads.custom_action``): widget updates, new items, or the events
        of ``ctx.model_turn()``. With ``sync=True`` it answers ``threads.sync_custom_action``
        and returns the sender's updated item (or None). It runs inside an app context of the
        host app; a name nobody registered is refused with 400 ``unsupported_action``.
        """

        def register(handler: Handler) -> Handler:
            if name in self._actions:
                raise ValueError(f"the action {name!r} already has a handler")
            # Checked here, at import of the site's code, not on a visitor's first click.
            if sync and not inspect.iscoroutinefunction(handler):
                raise TypeError(f"the sync action {name!r} needs an 'async def' handler")
            if not sync and not inspect.isasyncgenfunction(handler):
                raise TypeError(
                    f"the action {name!r} needs an 'async def' handler that yields events "
                    "(or sync=True for one that returns the updated item)"
                )
            self._actions[name] = RegisteredAction(handler, sync)
            return handler

        return register

    def forget_visitor(self) -> None:
        """Call in the site's log-out view: the response drops the anonymous visitor cookie, so
        the next person at this browser is a new visitor who cannot see the old one's threads.
        With Flask-Login, ``logout_user()`` does it already (``CHATKIT_FORGET_VISITOR_ON_LOGOUT``).
        """
        forget_visitor(self.state(current_app))

    def adopt_visitor_threads(self) -> int:
        """Call in the site's log-in view once the user is signed in: the anonymous visitor's
        threads move to the account (atomically) and the visitor is forgotten. Returns how many
        moved. With Flask-Login, ``CHATKIT_ADOPT_VISITOR_THREADS=True`` makes ``login_user()``
        do it."""
        return adopt_visitor_threads(self.state(current_app))

    def init_app(self, app: Flask) -> None:
        """Validate the configuration (raises ``ConfigError`` naming the key) and register.

        Every check runs before anything is registered: a failed ``init_app`` leaves the app as
        it was.
        """
        settings = Settings.from_mapping(app.config)
        _check_no_clash(app, settings)
        limiter_cell: list[Limiter] = []
        server = client = None
        if settings.backend == "server":
            from .server.workers import check_gunicorn_worker

            check_gunicorn_worker()  # before the slow import of the ChatKit and Agents SDKs
            from .server.views import create_runtime, make_server_blueprint

            server = create_runtime(
                settings, lambda: limiter_cell[0], app, self._actions, self._store_engine
            )
        else:
            client = self._client or ChatKitClient(
                settings.api_key,
                api_base=settings.api_base,
                timeout=settings.upstream_timeout,
                retries=settings.upstream_retries,
                breaker_failures=settings.breaker_failures,
                breaker_cooldown=settings.breaker_cooldown,
            )
        for name in _LIMITER_KEYS:
            if isinstance(app.config.get(name), str):
                app.config[name] = _read(app.config, name)
        limiter = prepare_limiter(app, settings, self._limiter)
        limiter_cell.append(limiter)
        state = ChatKitState(
            settings=settings,
            limiter=limiter,
            cookie=VisitorCookie(
                settings.secret_key, settings.secret_key_fallbacks, settings.cookie_max_age
            ),
            user_loader=lambda: self._user_loader,
            client=client,
            server=server,
        )
        if server is not None:
            state.ready_checks["store"] = server.ready_problem
        app.extensions["chatkit"] = state
        log.info("chatkit_flask: %s backend (%s)", settings.backend, settings.backend_reason)
        blueprint = (
            make_server_blueprint(state) if server is not None else make_hosted_blueprint(state)
        )
        app.register_blueprint(blueprint)
        if not settings.host_default_limits:
            # The chat's routes (its config and static helper too) answer to the chat's own
            # limits: a visitor who browses past the site's default limits keeps the chat.
            limiter.exempt(blueprint, flags=ExemptionScope.DEFAULT)
        self._apps.add(app)
        app.cli.add_command(chatkit_cli)
        connect_flask_login(app, state)
        guard_header_hook(app, limiter)
        init_app_logging()
        if settings.metrics_enabled:
            from .metrics import init_metrics, set_circuit_state

            init_metrics(app)
            breaker = getattr(client, "breaker", None)
            if breaker is not None and breaker.on_change is None:
                breaker.on_change = set_circuit_state
        if settings.allowed_origins:
            # flask-cors answers preflights and adds the headers to every response of the
            # prefix, error responses included, so a cross-origin page can read a 429.
            CORS(
                app,
                # The prefix itself too: server mode's endpoint is POST {prefix}.
                resources={
                    rf"{re.escape(settings.url_prefix)}(/.*)?$": {
                        "origins": list(settings.allowed_origins)
                    }
                },
                supports_credentials=True,
                methods=["POST", "OPTIONS"],
                allow_headers=["Content-Type", "X-Request-ID"],
                expose_headers=[
                    "Retry-After",
                    "X-Request-ID",
                    "X-RateLimit-Limit",
                    "X-RateLimit-Remaining",
                    "X-RateLimit-Reset",
                ],
                max_age=600,
            )

    def close(self, app: Flask | None = None) -> None:
        """Release what server mode holds for ``app`` (default: every app this object was
        initialised on): its event loop thread, worker threads, store and model connections.
        Also done at interpreter exit. Safe to call twice; a later request starts afresh.
        Hosted mode holds nothing of the kind."""
        for target in [app] if app is not None else list(self._apps):
            runtime = self.state(target).server
            if runtime is not None:
                runtime.close()

    @staticmethod
    def state(app: Flask) -> ChatKitState:
        """The extension's state on ``app`` (settings, limiter, client)."""
        return app.extensions["chatkit"]


def _check_no_clash(app: Flask, settings: Settings) -> None:
    """Refuse to register over something of the host's: a second ChatKit, a blueprint of the
    same name, a route under the prefix, a ``flask chatkit`` command, the session cookie."""
    if "chatkit" in app.extensions:
        raise RuntimeError("ChatKit is already registered on this app")
    if BLUEPRINT_NAME in app.blueprints:
        raise RuntimeError(
            f"the app already has a blueprint named {BLUEPRINT_NAME!r}: ChatKit registers one "
            "of that name; rename yours"
        )
    prefix = settings.url_prefix
    for rule in app.url_map.iter_rules():
        if rule.rule == prefix or rule.rule.startswith(prefix + "/"):
            raise ConfigError(
                "CHATKIT_URL_PREFIX",
                f"the app already routes {rule.rule} ({rule.endpoint}); choose another prefix",
            )
    if "chatkit" in app.cli.commands:
        raise RuntimeError("the app already has a 'flask chatkit' command group")
    session_cookie = app.config.get("SESSION_COOKIE_NAME") or "session"
    if settings.cookie_name == session_cookie:
        raise ConfigError(
            "CHATKIT_COOKIE_NAME", f"{settings.cookie_name!r} is the app's session cookie"
        )
