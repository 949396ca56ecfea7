"""How many replies one visitor or user may have streaming at once, across every worker and host.

Counted in the limiter's Redis when it has one (a counter per owner with a lease, so a worker
that dies mid-stream cannot hold a slot for ever), else in this process. A storage failure lets
the stream through (logged): the message limits still apply.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from limits.storage import RedisClusterStorage, RedisStorage

__all__ = ["StreamSlots"]

log = logging.getLogger("chatkit_flask")

# KEYS[1]: the owner's counter; ARGV: the cap, the lease in seconds. 1 = a slot was taken.
_ACQUIRE = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
"""
_RELEASE = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 1 then return redis.call('DECR', KEYS[1]) end
redis.call('DEL', KEYS[1])
return 0
"""


class StreamSlots:
    """At most ``cap`` concurrent streams per owner. ``storage`` returns the limiter's storage
    (or None while limits are off: then nothing is counted)."""

    def __init__(self, storage: Callable[[], Any], cap: int, lease: float) -> None:
        self._storage = storage
        self.cap = cap
        self._lease = max(60, int(lease))
        self._local: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._scripts: dict[int, tuple[Any, Any]] = {}

    def _redis(self) -> tuple[Any, Any] | None:
        storage = self._storage()
        if not isinstance(storage, RedisStorage) or isinstance(storage, RedisClusterStorage):
            return None
        scripts = self._scripts.get(id(storage))
        if scripts is None:
            client = storage.get_connection()
            scripts = (client.register_script(_ACQUIRE), client.register_script(_RELEASE))
            self._scripts[id(storage)] = scripts
        return scripts

    @staticmethod
    def _key(owner: str) -> str:
        return f"chatkit:streams:{owner}"

    def open_streams(self, owner: str) -> int | None:
        """How many slots ``owner`` holds now across every worker; None when they are counted
        per process (no Redis: each worker knows only its own). Storage errors propagate."""
        if self._storage() is None or self._redis() is None:
            return None
        client = self._storage().get_connection()
        return int(client.get(self._key(owner)) or 0)

    def clear(self, owner: str) -> None:
        """Free every slot of ``owner`` (a support case: streams a crashed worker left behind
        expire with their lease anyway). Storage errors propagate."""
        if self._storage() is not None and self._redis() is not None:
            self._storage().get_connection().delete(self._key(owner))

    def acquire(self, owner: str) -> bool:
        """Take a slot for ``owner``; False when they already stream ``cap`` replies."""
        if self._storage() is None:
            return True
        scripts = self._redis()
        if scripts is not None:
            try:
                return bool(scripts[0](keys=[self._key(owner)], args=[self.cap, self._lease]))
            except Exception as exc:  # a storage failure must not refuse the message
                log.warning("chatkit_flask: stream slots unavailable (%s)", type(exc).__name__)
                return True
        with self._lock:
            if self._local[owner] >= self.cap:
                return False
            self._local[owner] += 1
            return True

    def release(self, owner: str) -> None:
        """Give ``owner``'s slot back (when the stream ends, however it ends)."""
        if self._storage() is None:
            return
        scripts = self._redis()
        if scripts is not None:
            try:
                scripts[1](keys=[self._key(owner)])
            except Exception as exc:  # the lease expires the slot anyway
                log.warning("chatkit_flask: stream slot release failed (%s)", type(exc).__name__)
            return
        with self._lock:
            self._local[owner] -= 1
            if self._local[owner] <= 0:
                del self._local[owner]
