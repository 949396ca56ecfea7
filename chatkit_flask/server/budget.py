"""Token budgets: model tokens (input + output) per visitor or user and for the whole site, in
Flask-Limiter notation (``200000 per day``), counted in the limiter's storage (Redis: exact
across workers and hosts).

Charged from the ``usage`` the model reports at the end of each reply, checked before the next
message: a reply that is under way when a budget runs out finishes, the next message is refused.
A reply the visitor cancels reports no usage and is not charged (its message still counted
against the message limits). Windows are ``limits``' fixed windows: a day starts at the first
charge. A storage failure lets messages through (logged); the message limits still apply.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from limits import RateLimitItem, parse_many

__all__ = ["TokenBudget"]

log = logging.getLogger("chatkit_flask")


class TokenBudget:
    """``per_user``/``site`` are limit strings ("" = none); ``storage()`` gives the storage
    counting now (None while limits are off)."""

    def __init__(self, storage: Callable[[], Any], per_user: str, site: str) -> None:
        self._storage = storage
        self._user = parse_many(per_user) if per_user else []
        self._site = parse_many(site) if site else []

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

    def exceeded(self, owner: str) -> tuple[str, int] | None:
        """``(scope, seconds until it resets)`` of a spent budget of ``owner``'s, or None."""
        storage = self._storage()
        if storage is None or not self.enabled:
            return None
        try:
            for scope, item, key in self._counters(owner):
                if storage.get(key) >= item.amount:
                    wait = math.ceil(storage.get_expiry(key) - time.time())
                    return scope, max(1, wait)
        except Exception as exc:
            log.warning("chatkit_flask: token budget unreadable (%s)", type(exc).__name__)
        return None

    def charge(self, owner: str, tokens: int) -> None:
        """Add ``tokens`` to every budget of ``owner``'s (blocking: not on the event loop)."""
        storage = self._storage()
        if storage is None or not self.enabled or tokens <= 0:
            return
        try:
            for _, item, key in self._counters(owner):
                storage.incr(key, item.get_expiry(), amount=tokens)
        except Exception as exc:
            log.warning("chatkit_flask: token budget not charged (%s)", type(exc).__name__)
