"""How often callers may mint: Flask-Limiter on the configured storage (Redis in production)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from flask import Flask, Response, g
from flask_limiter import Limiter
from limits.errors import ConfigurationError, StorageError
from redis.exceptions import RedisError

from .settings import ConfigError, Settings

__all__ = ["STORAGE_ERRORS", "apply_limits", "build_limiter", "storage_options"]

log = logging.getLogger("chatkit_flask")

# What a storage failure looks like when it reaches the view (fail-closed mode only).
STORAGE_ERRORS: tuple[type[Exception], ...] = (RedisError, StorageError, ConnectionError, OSError)

_REDIS_SCHEMES = ("redis", "rediss", "redis+", "valkey", "valkeys", "valkey+")


def storage_options(settings: Settings, configured: dict[str, Any] | None) -> dict[str, Any]:
    """Short socket timeouts for Redis-like storages (redis-py waits 5 s by default), merged
    under whatever the app configured in RATELIMIT_STORAGE_OPTIONS."""
    options: dict[str, Any] = {}
    if settings.storage_uri.startswith(_REDIS_SCHEMES):
        options = {
            "socket_connect_timeout": settings.redis_timeout,
            "socket_timeout": settings.redis_timeout,
            "health_check_interval": 30,
        }
    options.update(configured or {})
    return options


def _visitor_key() -> str:
    return g.chatkit_identity.limit_key


def _ip_key() -> str:
    return "ip:" + g.chatkit_client_network


def _global_key() -> str:
    return "global"


class _FallbackSafeLimiter(Limiter):
    """Flask-Limiter with its storage-failure race closed.

    When the storage fails, the first request to notice switches the limiter to the in-memory
    fallback and re-evaluates. A concurrent request whose own Redis call fails a moment later
    finds the switch already made and re-raises instead (Flask-Limiter 4.1.1 checks
    ``not self._storage_dead``): a 503 from the view or a 500 from the header hook. Here such a
    request is simply re-evaluated against the fallback, as the first one was.
    """

    def _check_request_limit(
        self, callable_name: str | None = None, in_middleware: bool = True
    ) -> None:
        try:
            super()._check_request_limit(callable_name=callable_name, in_middleware=in_middleware)
        except STORAGE_ERRORS:
            if not (self._in_memory_fallback_enabled and self._storage_dead):
                raise
            self.context.seen_limits.clear()
            super()._check_request_limit(callable_name=callable_name, in_middleware=in_middleware)


def _guard_header_hook(app: Flask, limiter: Limiter) -> None:
    """The same race in Flask-Limiter's header hook (a 500 there): re-run it on the fallback."""
    original = getattr(Limiter, "_Limiter__inject_headers", None)
    hooks = app.after_request_funcs.get(None, [])
    for index, hook in enumerate(hooks):
        if isinstance(hook, partial) and hook.func is original and hook.args == (limiter,):

            def guarded(response: Response, inject: Callable = hook) -> Response:
                try:
                    return inject(response)
                except STORAGE_ERRORS:
                    if not (limiter._in_memory_fallback_enabled and limiter._storage_dead):
                        raise
                    return inject(response)

            hooks[index] = guarded


def build_limiter(app: Flask, settings: Settings) -> Limiter:
    """A Limiter owned by the extension, configured from ``settings``.

    Storage failure: fail-closed raises to the view (503); otherwise the in-memory fallback
    (per process) applies the same limits; with the fallback off, requests pass (fail-open).
    """
    fallback = settings.in_memory_fallback and not settings.fail_closed
    # Flask-Limiter treats a False constructor argument as "unset" and falls back to the app
    # config for these two, so the config must say the same as the settings decided.
    app.config["RATELIMIT_IN_MEMORY_FALLBACK_ENABLED"] = fallback
    app.config["RATELIMIT_HEADERS_ENABLED"] = settings.headers_enabled
    limiter = _FallbackSafeLimiter(
        _ip_key,
        storage_uri=settings.storage_uri,
        storage_options=storage_options(settings, app.config.get("RATELIMIT_STORAGE_OPTIONS")),
        strategy=settings.strategy,
        headers_enabled=settings.headers_enabled,
        in_memory_fallback_enabled=fallback,
        swallow_errors=not settings.fail_closed and not fallback,
        key_prefix=settings.key_prefix,
    )
    if settings.headers_enabled:
        # Flask-Limiter adds Retry-After (time to the window's reset) to every response.
        # after_request functions run in reverse order, so this one, registered first, runs
        # after Flask-Limiter's and keeps only the Retry-After our own errors set.
        app.after_request(_keep_own_retry_after)
    try:
        limiter.init_app(app)
    except ConfigurationError as exc:
        raise ConfigError("RATELIMIT_STORAGE_URI", str(exc)) from None
    _guard_header_hook(app, limiter)
    if settings.storage_uri.startswith("memory://"):
        log.warning(
            "chatkit_flask: RATELIMIT_STORAGE_URI is memory:// - limits are per process; "
            "with several workers or hosts they multiply. Use redis:// in production."
        )
    return limiter


def _keep_own_retry_after(response: Response) -> Response:
    retry_after = g.get("chatkit_retry_after")
    if retry_after is None:
        response.headers.pop("Retry-After", None)
    else:
        response.headers["Retry-After"] = retry_after
    return response


def apply_limits(view: Callable[..., Any], limiter: Limiter, settings: Settings) -> Callable:
    """Wrap ``view`` in the per-user, per-IP and global limits that are configured.

    Limits are evaluated in order of window length (Flask-Limiter sorts them; ties keep
    registration order): per-user before per-IP before global within a window, and the first
    breach stops evaluation, so a visitor over their own limit does not spend the global cap.
    """
    for value, key_func, scope in (
        (settings.limit_per_user, _visitor_key, "user"),
        (settings.limit_per_ip, _ip_key, "ip"),
        (settings.limit_global, _global_key, "global"),
    ):
        if value:
            view = limiter.limit(
                value,
                key_func=key_func,
                methods=["POST"],
                error_message=scope,
            )(view)
    return view
