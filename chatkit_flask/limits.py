"""The chat's limits, declared to Flask-Limiter: per visitor or signed-in user, per client network
and a global cap.

Flask-Limiter is the limiter of record. The extension either builds its own ``Limiter`` from the
``RATELIMIT_*`` keys (Flask-Limiter's own names, meanings and defaults) or uses the one a host
app hands over; either way the endpoint's limits are ordinary ``limiter.limit(...)`` route
limits, so ``flask limiter limits`` lists them, ``RATELIMIT_ENABLED=False`` turns them off, and a
host's ``request_filter``, ``exempt``, ``on_breach`` and application limits apply as documented.

Every limit is one atomic hit in the storage (exact across processes and hosts: N concurrent
requests against a limit of K admit exactly K). Limits are hit in order of window length,
per-user before per-IP before global within a window, and the first breach stops the
evaluation: a request refused by a later limit has already counted against the earlier ones.

Added here, on every storage path (the extension's limiter or a host's):
- short Redis timeouts (``CHATKIT_REDIS_TIMEOUT``; redis-py waits 5 s by default);
- the fallback race closed: when the storage dies under concurrent requests, Flask-Limiter
  switches to its in-memory fallback on the first failure but re-raises the failures of
  requests already in flight (a 503 or 500). Those are re-evaluated on the fallback here.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any

from flask import Flask, Response, current_app, g, request
from flask_limiter import Limiter, RequestLimit
from limits.errors import ConfigurationError, StorageError
from limits.storage import RedisStorage
from redis.exceptions import RedisError

from .identity import client_network
from .settings import ConfigError, Settings

__all__ = [
    "ENDPOINT",
    "IPV6_AGGREGATE_PREFIX",
    "STORAGE_ERRORS",
    "LimitRule",
    "active_storage",
    "counter_args",
    "describe",
    "fallback_active",
    "limit_rules",
    "limited",
    "prepare_limiter",
    "retry_after",
    "storage_of",
]

log = logging.getLogger("chatkit_flask")

# What a failing storage raises (redis-py, valkey through limits, sockets).
STORAGE_ERRORS: tuple[type[Exception], ...] = (RedisError, StorageError, ConnectionError, OSError)

ENDPOINT = "chatkit.secret"  # the scope part of the endpoint's counter keys
# One end site's usual IPv6 allocation (RFC 6177, RIPE-690): 65,536 /64s, each with its own
# per-IP budget. CHATKIT_RATELIMIT_PER_IPV6_48 caps them together.
IPV6_AGGREGATE_PREFIX = 48
_REDIS_SCHEMES = ("redis", "rediss", "redis+", "valkey", "valkeys", "valkey+")
_registrations = itertools.count(1)
_TIMEOUT_KEYS = ("socket_connect_timeout", "socket_timeout")


@dataclass(frozen=True)
class LimitRule:
    """One configured limit: who it counts (``scope``), its value in Flask-Limiter notation and
    the key function that names the counter."""

    scope: str  # "user", "ip", "net48", "global" (and "requests" in server mode)
    value: str
    key_func: Callable[[], str]
    # Server mode: which requests the limit counts, and the counter's scope within the endpoint.
    exempt_when: Callable[[], bool] | None = None
    counter: str | None = None


def visitor_key() -> str:
    """The visitor's or signed-in user's counter key (a hash tag, never the raw id)."""
    return g.chatkit_identity.limit_key


def network_key() -> str:
    """The client network's counter key: the IPv4 address or the IPv6 prefix."""
    network = g.get("chatkit_client_network")
    if network is None:  # a host route counted by the extension's limiter's default key
        prefix = current_app.extensions["chatkit"].settings.ipv6_prefix
        network = client_network(request.remote_addr, prefix)
    return "ip:" + network


def ipv6_aggregate_key() -> str:
    """The client's IPv6 /48 counter key (only asked for IPv6 clients)."""
    return f"net{IPV6_AGGREGATE_PREFIX}:" + str(g.get("chatkit_ipv6_aggregate"))


def _not_ipv6() -> bool:
    return g.get("chatkit_ipv6_aggregate") is None


def global_key() -> str:
    return "global"


def limit_rules(
    settings: Settings,
    exempt_when: Callable[[], bool] | None = None,
    counter: str | None = None,
) -> list[LimitRule]:
    """The endpoint's configured limits, in registration order (user, IP, IPv6 /48, global).
    The /48 limit counts IPv6 clients only (exempt otherwise, as well as when ``exempt_when``)."""

    def not_ipv6_or_exempt() -> bool:
        return _not_ipv6() or bool(exempt_when and exempt_when())

    return [
        LimitRule(scope, value, key_func, exempt, counter)
        for scope, value, key_func, exempt in (
            ("user", settings.limit_per_user, visitor_key, exempt_when),
            ("ip", settings.limit_per_ip, network_key, exempt_when),
            ("net48", settings.limit_per_ipv6_48, ipv6_aggregate_key, not_ipv6_or_exempt),
            ("global", settings.limit_global, global_key, exempt_when),
        )
        if value
    ]


# ------------------------------------------------------------------------- the limiter


def _redis_like(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith(_REDIS_SCHEMES)


def prepare_limiter(app: Flask, settings: Settings, handed_over: Limiter | None) -> Limiter:
    """The limiter that holds the chat's limits: ``handed_over`` (in any state: initialised or
    not, enabled or not), or one built from the ``RATELIMIT_*`` keys and initialised on ``app``.

    Redis socket timeouts default to ``CHATKIT_REDIS_TIMEOUT`` wherever neither the limiter's
    constructor nor ``RATELIMIT_STORAGE_OPTIONS`` set them.
    """
    limiter = handed_over or Limiter(key_func=network_key)
    uri = limiter._storage_uri or app.config.get("RATELIMIT_STORAGE_URI")
    if limiter.initialized:
        _apply_timeouts_to_storage(limiter, settings.redis_timeout)
    elif _redis_like(uri):
        given = {**limiter._storage_options, **(app.config.get("RATELIMIT_STORAGE_OPTIONS") or {})}
        defaults = {key: settings.redis_timeout for key in _TIMEOUT_KEYS if key not in given}
        if defaults:
            app.config["RATELIMIT_STORAGE_OPTIONS"] = {
                **(app.config.get("RATELIMIT_STORAGE_OPTIONS") or {}),
                **defaults,
            }
    if handed_over is None:
        try:
            limiter.init_app(app)
        except ConfigurationError as exc:
            key = "RATELIMIT_STRATEGY" if "strategy" in str(exc) else "RATELIMIT_STORAGE_URI"
            raise ConfigError(key, str(exc)) from None
        if str(uri or "memory://").startswith("memory://") and limiter.enabled:
            log.warning(
                "chatkit_flask: RATELIMIT_STORAGE_URI is memory:// - limits are per process; "
                "with several workers or hosts they multiply. Use redis:// in production."
            )
    return limiter


def _apply_timeouts_to_storage(limiter: Limiter, timeout: float) -> None:
    """Short timeouts on an already built Redis storage, for connections opened from now on
    (nothing is connected before the first request)."""
    storage = limiter._storage
    if not isinstance(storage, RedisStorage):
        return
    kwargs = storage.get_connection().connection_pool.connection_kwargs
    for key in _TIMEOUT_KEYS:
        if kwargs.get(key) is None:  # not set by the host: redis-py's 5 s default
            kwargs[key] = timeout
            if f"orig_{key}" in kwargs:  # redis-py 8 restores this one after maintenance
                kwargs[f"orig_{key}"] = timeout


def active(limiter: Limiter) -> bool:
    """Whether ``limiter`` limits anything now (enabled and initialised on an app)."""
    return bool(limiter.enabled and limiter.initialized)


def storage_of(limiter: Limiter) -> Any | None:
    """The limiter's storage, or None while it is disabled or not initialised."""
    return limiter._storage if active(limiter) else None


def active_storage(limiter: Limiter) -> Any | None:
    """The storage counting right now: the limiter's, or its in-memory fallback while the
    storage is down (None while limits are off). For counters kept beside the limits."""
    if fallback_active(limiter):
        return limiter._fallback_storage
    return storage_of(limiter)


def fallback_active(limiter: Limiter) -> bool:
    """True while this process limits from Flask-Limiter's in-memory fallback."""
    return bool(active(limiter) and limiter._storage_dead and limiter._in_memory_fallback_enabled)


def describe(limiter: Limiter, app: Flask) -> dict[str, Any]:
    """What the limiter really runs with (for the CLI): storage URI, strategy, key prefix..."""
    config = app.config
    if limiter._in_memory_fallback_enabled or config.get("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED"):
        outage = "per-process in-memory fallback"
    elif limiter._swallow_errors or config.get("RATELIMIT_SWALLOW_ERRORS"):
        outage = "fail open (errors swallowed, no limits)"
    else:
        outage = "fail closed (503)"
    return {
        "enabled": bool(limiter.enabled and config.get("RATELIMIT_ENABLED", True)),
        "initialized": limiter.initialized,
        "storage_uri": limiter._storage_uri or config.get("RATELIMIT_STORAGE_URI") or "memory://",
        "strategy": limiter._strategy or config.get("RATELIMIT_STRATEGY") or "fixed-window",
        "key_prefix": limiter._key_prefix or config.get("RATELIMIT_KEY_PREFIX") or "",
        "outage": outage,
    }


# ------------------------------------------------------------------------- the route


def _record_breach(scope: str, _limit: RequestLimit) -> None:
    """``on_breach`` of each of the chat's limits: remember which scope refused the request."""
    g.chatkit_limit_scope = scope


def limited(
    view: Callable[..., Any], limiter: Limiter, rules: Iterable[LimitRule]
) -> Callable[..., Any]:
    """``view`` with ``rules`` as Flask-Limiter route limits, guarded against the fallback
    race."""

    @wraps(view)
    def started(*args: Any, **kwargs: Any) -> Any:
        g.chatkit_limits_passed = True  # from here on a storage error is not the limiter's
        return view(*args, **kwargs)

    # Flask-Limiter files route limits under the view's qualified name: one name per
    # registration, so a module-level limiter shared by several apps (an app factory called
    # by each test) does not pile one app's limits onto the next.
    started.__qualname__ = f"{view.__qualname__}#{next(_registrations)}"

    decorated: Callable[..., Any] = started
    for rule in rules:
        decorated = limiter.limit(
            rule.value,
            key_func=rule.key_func,
            # Only POSTs count: a crawler's GET (405) must not spend a visitor's budget. (For
            # the other methods a host's default limits apply, and Flask-Limiter's CLI lists
            # them beside the endpoint's own for that reason.)
            methods=["POST"],
            exempt_when=rule.exempt_when,
            on_breach=partial(_record_breach, rule.scope),
            scope=rule.counter,
        )(decorated)

    @wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return decorated(*args, **kwargs)
        except STORAGE_ERRORS:
            if g.get("chatkit_limits_passed") or not fallback_active(limiter):
                raise
            # Our storage call failed after another request switched to the fallback.
            limiter.context.seen_limits.clear()
            return decorated(*args, **kwargs)

    guarded.__qualname__ = started.__qualname__  # the name Flask-Limiter's CLI looks up
    return guarded


def guard_header_hook(app: Flask, limiter: Limiter) -> bool:
    """The same race in Flask-Limiter's header hook (a 500 there): re-run it on the fallback.
    Returns False while the limiter has no hook on ``app`` yet (not initialised)."""
    original = getattr(Limiter, "_Limiter__inject_headers", None)
    hooks = app.after_request_funcs.get(None, [])
    for index, hook in enumerate(hooks):
        if isinstance(hook, partial) and hook.func is original and hook.args == (limiter,):

            def guarded(response: Response, inject: Callable = hook) -> Response:
                try:
                    return inject(response)
                except STORAGE_ERRORS:
                    if not fallback_active(limiter):
                        raise
                    return inject(response)

            hooks[index] = guarded
            return True
    return any(getattr(hook, "__name__", "") == "guarded" for hook in hooks)


def counter_args(limiter: Limiter, key: str, endpoint: str = ENDPOINT) -> list[str]:
    """The identifiers Flask-Limiter builds one of the endpoint's counters from."""
    prefix = limiter._key_prefix
    return [prefix, key, endpoint] if prefix else [key, endpoint]


def retry_after(limiter: Limiter, default: int = 60) -> int:
    """Seconds until the limit that refused this request resets (at least 1)."""
    current = limiter.current_limit
    if current is None:
        return default
    try:
        return max(1, math.ceil(current.window.reset_time - time.time()))
    except STORAGE_ERRORS:
        return max(1, current.limit.get_expiry())
