"""The ``ChatKit`` Flask extension: ``ChatKit(app)`` or ``chatkit.init_app(app)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask
from flask_cors import CORS
from flask_limiter import Limiter
from werkzeug.middleware.proxy_fix import ProxyFix

from .cli import chatkit_cli
from .identity import VisitorCookie
from .limits import REQUEST_KEYS, MintLimiter, build_storage
from .metrics import init_metrics, set_circuit_state
from .settings import Settings
from .upstream import ChatKitClient
from .views import make_blueprint

__all__ = ["ChatKit", "ChatKitState"]

UserLoader = Callable[[], Any]


@dataclass
class ChatKitState:
    """Per-app state, kept in ``app.extensions["chatkit"]``."""

    settings: Settings
    limits: MintLimiter  # the endpoint's limits, and their storage (``limits.storage``)
    limiter: Limiter | None  # the host app's Flask-Limiter, when it handed one over
    client: ChatKitClient
    cookie: VisitorCookie
    extension: ChatKit

    def exempt(self, blueprint: Any) -> None:
        """Keep a host app's Flask-Limiter defaults off one of the extension's blueprints."""
        if self.limiter is not None:
            self.limiter.exempt(blueprint)

    def load_user(self) -> Any:
        loader = self.extension._user_loader
        return loader() if loader is not None else None


class ChatKit:
    """Serves ``POST {CHATKIT_URL_PREFIX}/secret``, which mints ChatKit client secrets.

    ``limiter``: a ``flask_limiter.Limiter`` the host app already runs (already ``init_app``-ed);
    by default the extension builds its own from the ``RATELIMIT_*`` keys.
    ``client``: a ``ChatKitClient`` to use instead of one built from the settings.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        limiter: Limiter | None = None,
        client: ChatKitClient | None = None,
    ) -> None:
        self._limiter = limiter
        self._client = client
        self._user_loader: UserLoader | None = None
        if app is not None:
            self.init_app(app)

    def user_loader(self, func: UserLoader) -> UserLoader:
        """Register ``func() -> user id or None``. When it returns an id, that id is the ChatKit
        ``user`` and the per-user limit key; when None, the anonymous visitor cookie is used."""
        self._user_loader = func
        return func

    def init_app(self, app: Flask) -> None:
        """Validate the configuration (raises ``ConfigError`` naming the key) and register."""
        if "chatkit" in app.extensions:
            raise RuntimeError("ChatKit is already registered on this app")
        settings = Settings.from_mapping(app.config)
        if settings.trusted_proxies:
            n = settings.trusted_proxies
            app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)  # type: ignore[method-assign]
        limiter = self._limiter
        storage = limiter.storage if limiter is not None else build_storage(app, settings)
        key_prefix = getattr(limiter, "_key_prefix", None) or settings.key_prefix
        client = self._client or ChatKitClient(
            settings.api_key,
            api_base=settings.api_base,
            timeout=settings.upstream_timeout,
            retries=settings.upstream_retries,
            breaker_failures=settings.breaker_failures,
            breaker_cooldown=settings.breaker_cooldown,
        )
        state = ChatKitState(
            settings=settings,
            limits=MintLimiter(storage, settings, REQUEST_KEYS, key_prefix),
            limiter=limiter,
            client=client,
            cookie=VisitorCookie(
                settings.secret_key, settings.secret_key_fallbacks, settings.cookie_max_age
            ),
            extension=self,
        )
        app.extensions["chatkit"] = state
        app.register_blueprint(make_blueprint(state))
        app.cli.add_command(chatkit_cli)
        if settings.metrics_enabled:
            init_metrics(app)
            breaker = getattr(client, "breaker", None)
            if breaker is not None and breaker.on_change is None:
                breaker.on_change = set_circuit_state
        if settings.allowed_origins:
            # flask-cors answers preflights and adds the headers to every response of the
            # prefix, error responses included, so a cross-origin page can read a 429.
            CORS(
                app,
                resources={
                    rf"{settings.url_prefix}/.*": {"origins": list(settings.allowed_origins)}
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

    @staticmethod
    def state(app: Flask) -> ChatKitState:
        """The extension's state on ``app`` (settings, limiter, client)."""
        return app.extensions["chatkit"]
