"""Token budgets: model tokens (input + output) per visitor or user and for the whole site, in
Flask-Limiter notation (``200000 per day``), counted in the limiter's storage (Redis: exact
across workers and hosts).

Every reply **reserves** its worst case before the model is called (the estimated input plus
``max_output_tokens``, times the model calls it may make) and **settles** with what it really
cost once it ends: ``settle`` adds ``actual - reserved``. A reservation is admitted while every
budget's count is below its limit, checked and taken in one step (one Lua script in Redis), so
under any concurrency, across workers and hosts, a budget is overspent by at most one
reservation. A cancelled or failed reply is charged too (see ``costs.ReplyMeter``).

Windows are ``limits``' fixed windows: a day starts at the first charge. A storage failure lets
messages through (logged); the message limits still apply.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse_many
from limits.storage import RedisClusterStorage, RedisStorage

__all__ = ["BudgetSpent", "Reservation", "TokenBudget"]

log = logging.getLogger("chatkit_flask")

# KEYS: the counters; ARGV: the tokens to reserve, then (limit, window seconds) per key.
# Returns 0 when reserved, else the 1-based index of the first spent counter.
_RESERVE = """
local amount = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[2 * i]) then return i end
end
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, amount)
  if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ARGV[2 * i + 1]) end
end
return 0
"""
# KEYS: the counters; ARGV: actual - reserved, then the window seconds per key. A counter whose
# window ended since the reservation starts a new window only for a positive difference.
_SETTLE = """
local delta = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    if tonumber(redis.call('INCRBY', key, delta)) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
  elseif delta > 0 then
    redis.call('SET', key, delta, 'EX', ARGV[i + 1])
  end
end
return 0
"""


@dataclass(frozen=True)
class Reservation:
    """Tokens set aside for one reply of ``owner``'s (settle it exactly once)."""

    owner: str
    tokens: int


class BudgetSpent(Exception):
    """A budget of the owner's is spent: ``scope`` (``tokens`` or ``tokens_global``) and the
    seconds until its window resets."""

    def __init__(self, scope: str, retry_after: int) -> None:
        super().__init__(scope)
        self.scope = scope
        self.retry_after = retry_after


class TokenBudget:
    """``per_user``/``site`` are limit strings ("" = none); ``storage()`` gives the storage
    counting now (None while limits are off). Blocking: call off the event loop."""

    def __init__(self, storage: Callable[[], Any], per_user: str, site: str) -> None:
        self._storage = storage
        self._user = parse_many(per_user) if per_user else []
        self._site = parse_many(site) if site else []
        self._lock = threading.Lock()  # the in-memory fallback's check-and-reserve
        self._scripts: dict[int, tuple[Any, Any]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._user or self._site)

    def _counters(self, owner: str) -> list[tuple[str, RateLimitItem, str]]:
        return [("tokens", item, item.key_for("tokens", owner)) for item in self._user] + [
            ("tokens_global", item, item.key_for("tokens", "global")) for item in self._site
        ]

    def counters(self, owner: str | None) -> list[tuple[str, RateLimitItem, str]]:
        """``(scope, limit, storage key)`` of ``owner``'s budgets, or of the site's (None)."""
        if owner is None:
            return [c for c in self._counters("") if c[0] == "tokens_global"]
        return [c for c in self._counters(owner) if c[0] == "tokens"]

    def usage(self, owner: str | None) -> list[tuple[str, RateLimitItem, int, int]]:
        """``(scope, limit, tokens used, seconds until the window resets)`` of ``owner``'s
        budgets or the site's (None), for operators. Storage errors propagate."""
        storage = self._storage()
        if storage is None:
            return []
        now = time.time()
        rows = []
        for scope, item, key in self.counters(owner):
            used = int(storage.get(key))
            resets = max(0, math.ceil(storage.get_expiry(key) - now)) if used else 0
            rows.append((scope, item, used, resets))
        return rows

    def clear(self, owner: str | None) -> int:
        """Forget what ``owner`` (None: the site) has spent; returns how many budgets had been
        used. Storage errors propagate."""
        storage = self._storage()
        if storage is None:
            return 0
        used = 0
        for _, _, key in self.counters(owner):
            used += storage.get(key) > 0
            storage.clear(key)
        return used

    def _redis(self, storage: Any) -> tuple[Any, Any] | None:
        """The two scripts on ``storage``'s Redis (None for memory or a cluster: keys of one
        call may live on different nodes there)."""
        if not isinstance(storage, RedisStorage) or isinstance(storage, RedisClusterStorage):
            return None
        scripts = self._scripts.get(id(storage))
        if scripts is None:
            client = storage.get_connection()
            scripts = (client.register_script(_RESERVE), client.register_script(_SETTLE))
            self._scripts[id(storage)] = scripts
        return scripts

    def exceeded(self, owner: str) -> tuple[str, int] | None:
        """``(scope, seconds until it resets)`` of a spent budget of ``owner``'s, or None (a
        cheap look before any work; :meth:`reserve` is what admits)."""
        storage = self._storage()
        if storage is None or not self.enabled:
            return None
        try:
            for scope, item, key in self._counters(owner):
                if storage.get(key) >= item.amount:
                    return scope, self._wait(storage, key)
        except Exception as exc:
            log.warning("chatkit_flask: token budget unreadable (%s)", type(exc).__name__)
        return None

    @staticmethod
    def _wait(storage: Any, key: str) -> int:
        return max(1, math.ceil(storage.get_expiry(key) - time.time()))

    def reserve(self, owner: str, tokens: int) -> Reservation | None:
        """Set ``tokens`` aside on every budget of ``owner``'s, all or none; raises
        :class:`BudgetSpent` when one is spent. None when nothing is counted (no budget, limits
        off, or the storage failed: logged)."""
        storage = self._storage()
        if storage is None or not self.enabled:
            return None
        tokens = max(0, int(tokens))
        counters = self._counters(owner)
        try:
            scripts = self._redis(storage)
            if scripts is not None:
                args: list[Any] = [tokens]
                for _, item, _key in counters:
                    args += [item.amount, item.get_expiry()]
                keys = [storage.prefixed_key(key) for _, _, key in counters]
                spent = int(scripts[0](keys=keys, args=args))
            else:
                spent = self._reserve_locally(storage, counters, tokens)
        except Exception as exc:  # a storage failure must not refuse the message
            log.warning("chatkit_flask: token budget not reserved (%s)", type(exc).__name__)
            return None
        if spent:
            scope, _, key = counters[spent - 1]
            raise BudgetSpent(scope, self._wait(storage, key))
        return Reservation(owner, tokens)

    def _reserve_locally(
        self, storage: Any, counters: list[tuple[str, RateLimitItem, str]], tokens: int
    ) -> int:
        with self._lock:  # one process: the in-memory fallback or a cluster (documented)
            for index, (_, item, key) in enumerate(counters, 1):
                if storage.get(key) >= item.amount:
                    return index
            for _, item, key in counters:
                storage.incr(key, item.get_expiry(), amount=tokens)
        return 0

    def settle(self, reservation: Reservation | None, owner: str, tokens: int) -> None:
        """Charge what a reply really cost: ``tokens - reservation.tokens`` more (or fewer),
        or all of ``tokens`` when nothing was reserved."""
        storage = self._storage()
        if storage is None or not self.enabled:
            return
        delta = int(tokens) - (reservation.tokens if reservation is not None else 0)
        if delta == 0:
            return
        counters = self._counters(owner)
        try:
            scripts = self._redis(storage)
            if scripts is not None:
                keys = [storage.prefixed_key(key) for _, _, key in counters]
                scripts[1](keys=keys, args=[delta] + [i.get_expiry() for _, i, _ in counters])
                return
            with self._lock:
                for _, item, key in counters:
                    if delta > 0 or storage.get(key) > 0:
                        storage.incr(key, item.get_expiry(), amount=max(delta, -storage.get(key)))
        except Exception as exc:
            log.warning("chatkit_flask: token budget not settled (%s)", type(exc).__name__)

    def charge(self, owner: str, tokens: int) -> None:
        """Add ``tokens`` to every budget of ``owner``'s (without a reservation)."""
        if tokens > 0:
            self.settle(None, owner, tokens)

    def used(self, owner: str) -> dict[str, int]:
        """Tokens counted now per budget of ``owner``'s, keyed ``"<scope> <limit>"``
        (reservations of replies under way included)."""
        storage = self._storage()
        if storage is None:
            return {}
        return {f"{scope} {item}": storage.get(key) for scope, item, key in self._counters(owner)}
