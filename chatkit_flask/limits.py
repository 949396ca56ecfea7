"""How often callers may mint: per user, per IP and global limits on the limiter's storage.

The storage is the one Flask-Limiter would build from ``RATELIMIT_STORAGE_URI`` and
``RATELIMIT_STORAGE_OPTIONS`` (any URI the ``limits`` library accepts), or the storage of a
host app's own ``flask_limiter.Limiter``. The endpoint's limits are checked here, together,
before the upstream call, with ``limits`` (Flask-Limiter's engine) rather than Flask-Limiter's
decorators: those cost one Redis round trip per limit plus two for the headers, and per-request
hooks on every route of the app (measured in docs/benchmark.md).

- On a Redis-protocol storage (redis://, rediss://, unix sockets, Sentinel, Valkey) with the
  fixed-window strategy, one Lua script checks every limit and, only if all pass, counts the
  request in all of them: one round trip per request, exact across processes and hosts, and a
  refused request consumes nothing. The counters are ``limits``' own fixed-window keys, so
  ``limits``/Flask-Limiter tools (and ``flask chatkit usage``) read them as usual.
- On any other storage or strategy (memory, Redis Cluster, moving or sliding windows), each limit
  is hit in turn through ``limits``, as Flask-Limiter's decorators would: every hit is atomic,
  and the first breach stops the check.
- When the storage fails: fail-closed raises ``LimiterUnavailable`` (503); otherwise each
  process limits from memory (the same limits, counted per process) and re-probes the storage
  after 1, 2, 4 ... 32 s; with the fallback off, requests pass (fail-open, logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask, g
from limits import RateLimitItem, WindowStats, parse_many
from limits.errors import ConfigurationError, StorageError
from limits.storage import (
    MemoryStorage,
    RedisClusterStorage,
    RedisStorage,
    Storage,
    storage_from_string,
)
from limits.strategies import STRATEGIES, RateLimiter
from redis.exceptions import RedisError

from .settings import ConfigError, Settings

__all__ = [
    "ENDPOINT",
    "REQUEST_KEYS",
    "STORAGE_ERRORS",
    "LimiterUnavailable",
    "MintLimiter",
    "Rule",
    "Verdict",
    "build_storage",
    "storage_options",
]

log = logging.getLogger("chatkit_flask")

# What a failing storage raises (redis-py, valkey through limits, sockets).
STORAGE_ERRORS: tuple[type[Exception], ...] = (RedisError, StorageError, ConnectionError, OSError)
ENDPOINT = "chatkit.secret"  # the scope part of every counter key, as Flask-Limiter names it

_REDIS_SCHEMES = ("redis", "rediss", "redis+", "valkey", "valkeys", "valkey+")
_MAX_PROBE_DELAY = 32.0

# KEYS: the counters, in evaluation order. ARGV: limit, expiry for each counter.
# Returns {0, count1, ttl1, count2, ttl2, ...} when every counter had room (all were counted),
# or {i, count_i, ttl_i} for the first counter i that was full (nothing was counted).
_CHECK_AND_COUNT = """
local n = #KEYS
for i = 1, n do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current >= tonumber(ARGV[2 * i - 1]) then
    local ttl = redis.call('TTL', KEYS[i])
    if ttl < 0 then
      redis.call('EXPIRE', KEYS[i], ARGV[2 * i])
      ttl = tonumber(ARGV[2 * i])
    end
    return {i, current, ttl}
  end
end
local out = {0}
for i = 1, n do
  local count = redis.call('INCR', KEYS[i])
  local ttl
  if count == 1 then
    redis.call('EXPIRE', KEYS[i], ARGV[2 * i])
    ttl = tonumber(ARGV[2 * i])
  else
    ttl = redis.call('TTL', KEYS[i])
    if ttl < 0 then
      redis.call('EXPIRE', KEYS[i], ARGV[2 * i])
      ttl = tonumber(ARGV[2 * i])
    end
  end
  out[2 * i] = count
  out[2 * i + 1] = ttl
end
return out
"""


class LimiterUnavailable(Exception):
    """The limiter's storage failed and ``CHATKIT_RATELIMIT_FAIL_CLOSED`` is on."""


@dataclass(frozen=True)
class Rule:
    """One limit: its scope ("user", "ip", "global"), window and the key it counts."""

    scope: str
    item: RateLimitItem
    key_func: Callable[[], str]


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check. ``limit``/``remaining``/``reset_at`` describe the breached limit,
    or when none was, the one with the fewest requests left (for the X-RateLimit-* headers)."""

    allowed: bool
    scope: str | None
    limit: int
    remaining: int
    reset_at: int

    @property
    def retry_after(self) -> int:
        return max(1, self.reset_at - int(time.time()))


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


def build_storage(app: Flask, settings: Settings) -> Storage:
    """The limiter storage from ``RATELIMIT_STORAGE_URI``, as Flask-Limiter would build it.
    Nothing is contacted here: the first request opens the connection."""
    options = storage_options(settings, app.config.get("RATELIMIT_STORAGE_OPTIONS"))
    try:
        storage = storage_from_string(settings.storage_uri, **options)
    except ConfigurationError as exc:
        raise ConfigError("RATELIMIT_STORAGE_URI", str(exc)) from None
    if settings.storage_uri.startswith("memory://"):
        log.warning(
            "chatkit_flask: RATELIMIT_STORAGE_URI is memory:// - limits are per process; "
            "with several workers or hosts they multiply. Use redis:// in production."
        )
    return storage


# How each scope keys the current request (identity and client network come from views.py).
REQUEST_KEYS: dict[str, Callable[[], str]] = {
    "user": lambda: g.chatkit_identity.limit_key,
    "ip": lambda: "ip:" + g.chatkit_client_network,
    "global": lambda: "global",
}


def _rules(settings: Settings, keys: dict[str, Callable[[], str]]) -> list[Rule]:
    """The configured limits in evaluation order: shorter windows first, and within a window
    user before IP before global (so a visitor over their own limit is told so)."""
    rules = [
        Rule(scope, item, keys[scope])
        for scope, value in (
            ("user", settings.limit_per_user),
            ("ip", settings.limit_per_ip),
            ("global", settings.limit_global),
        )
        if value
        for item in parse_many(value)
    ]
    return sorted(rules, key=lambda rule: rule.item.get_expiry())  # stable: keeps scope order


class MintLimiter:
    """Checks and counts one mint request against every configured limit. Thread-safe."""

    def __init__(
        self,
        storage: Storage,
        settings: Settings,
        keys: dict[str, Callable[[], str]],
        key_prefix: str,
    ) -> None:
        self.rules = _rules(settings, keys)
        self.storage = storage
        self.strategy = settings.strategy
        self._prefix = key_prefix
        self._fail_closed = settings.fail_closed
        self._fallback_enabled = settings.in_memory_fallback and not settings.fail_closed
        self._memory = STRATEGIES[settings.strategy](MemoryStorage())
        self._generic = STRATEGIES[settings.strategy](storage)
        self._script = None
        if (
            settings.strategy == "fixed-window"
            and isinstance(storage, RedisStorage)
            and not isinstance(storage, RedisClusterStorage)  # keys may live on other nodes
        ):
            self._script = storage.get_connection().register_script(_CHECK_AND_COUNT)
        self._lock = threading.Lock()
        self._dead = False
        self._next_probe = 0.0
        self._probe_delay = 1.0
        self.on_storage_error: Callable[[], None] | None = None

    @property
    def single_round_trip(self) -> bool:
        """Whether all limits are checked in one Lua script (else one call per limit)."""
        return self._script is not None

    @property
    def fallback_active(self) -> bool:
        """True while this process limits from memory because the storage failed."""
        return self._dead

    def window_stats(self, item: RateLimitItem, key: str) -> WindowStats:
        """Reset time and remaining requests of one limit for ``key`` (for the CLI)."""
        return self._generic.get_window_stats(item, *self.identifiers(key))

    def clear(self, item: RateLimitItem, key: str) -> None:
        """Forget the counter of one limit for ``key`` (for the CLI)."""
        self._generic.clear(item, *self.identifiers(key))

    def identifiers(self, key: str) -> tuple[str, ...]:
        """The identifiers ``limits`` builds a counter key from, as Flask-Limiter would."""
        return (self._prefix, key, ENDPOINT) if self._prefix else (key, ENDPOINT)

    def check(self) -> Verdict:
        """Check and, when allowed, count the current request. Call inside the request."""
        if not self.rules:
            return Verdict(True, None, 0, 0, 0)
        keyed = [(rule, self.identifiers(rule.key_func())) for rule in self.rules]
        if self._dead and not self._storage_back():
            return self._hit_each(self._memory, keyed)
        try:
            if self._script is not None:
                return self._check_script(keyed)
            return self._hit_each(self._generic, keyed)
        except STORAGE_ERRORS as exc:
            return self._storage_failed(exc, keyed)

    def _check_script(self, keyed: list[tuple[Rule, tuple[str, ...]]]) -> Verdict:
        assert self._script is not None
        storage: RedisStorage = self.storage  # type: ignore[assignment]
        keys = [storage.prefixed_key(rule.item.key_for(*ids)) for rule, ids in keyed]
        args: list[int] = []
        for rule, _ in keyed:
            args += [rule.item.amount, rule.item.get_expiry()]
        result = [int(value) for value in self._script(keys, args)]
        now = int(time.time())
        if result[0]:
            rule = keyed[result[0] - 1][0]
            return Verdict(False, rule.scope, rule.item.amount, 0, now + result[2])
        best = None
        for index, (rule, _) in enumerate(keyed):
            remaining = rule.item.amount - result[1 + 2 * index]
            if best is None or remaining < best.remaining:
                reset_at = now + result[2 + 2 * index]
                best = Verdict(True, None, rule.item.amount, remaining, reset_at)
        assert best is not None
        return best

    @staticmethod
    def _hit_each(strategy: RateLimiter, keyed: list[tuple[Rule, tuple[str, ...]]]) -> Verdict:
        for rule, ids in keyed:
            if not strategy.hit(rule.item, *ids):
                stats = strategy.get_window_stats(rule.item, *ids)
                return Verdict(False, rule.scope, rule.item.amount, 0, int(stats.reset_time))
        rule, ids = keyed[0]
        stats = strategy.get_window_stats(rule.item, *ids)
        return Verdict(True, None, rule.item.amount, stats.remaining, int(stats.reset_time))

    def _storage_failed(self, exc: Exception, keyed: list[tuple[Rule, tuple[str, ...]]]) -> Verdict:
        if self.on_storage_error is not None:
            self.on_storage_error()
        if self._fail_closed:
            raise LimiterUnavailable(type(exc).__name__) from exc
        if not self._fallback_enabled:
            log.error(
                "chatkit_flask: rate limit storage failed (%s); request allowed unlimited",
                type(exc).__name__,
            )
            return Verdict(True, None, 0, 0, 0)
        with self._lock:
            if not self._dead:
                self._dead = True
                self._probe_delay = 1.0
                self._next_probe = time.monotonic() + self._probe_delay
                log.warning(
                    "chatkit_flask: rate limit storage unreachable (%s) - limiting from memory "
                    "in this process until it answers",
                    type(exc).__name__,
                )
        return self._hit_each(self._memory, keyed)

    def _storage_back(self) -> bool:
        """While in fallback: probe the storage when due; True once it answers again."""
        with self._lock:
            if time.monotonic() < self._next_probe:
                return False
            # One request probes; the others keep using memory meanwhile.
            self._next_probe = time.monotonic() + self._probe_delay
            self._probe_delay = min(self._probe_delay * 2, _MAX_PROBE_DELAY)
        if not self.storage.check():
            return False
        with self._lock:
            if self._dead:
                self._dead = False
                log.warning("chatkit_flask: rate limit storage answers again - limits back in it")
        return True
