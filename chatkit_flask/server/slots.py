"""How many replies one visitor or user may have streaming at once, across every worker and host.

Each reply holds its own slot: a member of the owner's sorted set in the limiter's Redis whose
score is the slot's deadline. The reply renews its deadline while it streams; a slot whose holder
died (a killed worker, a cut shutdown) lapses ``lease`` seconds after its last renewal, and the
next attempt sweeps it. A refused attempt changes nothing but that sweep. Without Redis the
slots are counted in this process. A storage failure lets the stream through (logged): the
message limits still apply.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from limits.storage import RedisClusterStorage, RedisStorage

from ..identity import hash_id

__all__ = ["Slot", "StreamSlots"]

log = logging.getLogger("chatkit_flask")

# KEYS[1]: the owner's set; ARGV: cap, lease (ms), token. Returns {taken (1/0), lapsed}: lapsed
# members (holders that stopped renewing: a killed worker) go first; a refusal writes nothing
# else (no expiry is extended by knocking). The set itself lives three leases, so a lapsed member
# is usually swept (and logged) here rather than vanishing with the key.
_ACQUIRE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lapsed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return {0, lapsed} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 3)
return {1, lapsed}
"""
# ARGV: lease (ms), token. 1 = renewed; 0 = the slot had lapsed (it is not taken back).
_RENEW = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 3)
return 1
"""
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 0
"""


class Slot:
    """One reply's slot. :meth:`hold` wraps the reply's body so the slot is renewed while frames
    (heartbeats included) go out, and released when the body is closed; :meth:`release` is safe
    to call more than once."""

    def __init__(self, slots: StreamSlots, owner: str, token: str | None) -> None:
        self._slots = slots
        self.owner = owner
        self.token = token  # None: not counted (limits off, or the storage failed)
        self._renewed = time.monotonic()
        self._released = False

    def renew_due(self) -> bool:
        """Whether a renewal is due (cheap: no storage call)."""
        return (
            self.token is not None
            and not self._released
            and time.monotonic() - self._renewed >= self._slots.renew_every
        )

    def renew_if_due(self) -> None:
        if not self.renew_due():
            return
        self._renewed = time.monotonic()
        self._slots._renew(self)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self.token is not None:
            self._slots._release(self)

    def hold(self, body: Iterable[bytes]) -> _HeldBody:
        return _HeldBody(body, self)


class _HeldBody:
    """A response body that renews its slot as it is written and releases it at its end or on
    close, whichever comes first (the body's own ``close`` runs first: it cancels the answer)."""

    def __init__(self, body: Iterable[bytes], slot: Slot) -> None:
        self._body = body
        self._slot = slot

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            self._slot.renew_if_due()
            yield chunk
        self._slot.release()  # read to its end: free now (a test client may never close it)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """On the loop (server mode's ASGI worker): the storage calls go to a thread."""
        async for chunk in self._body:  # type: ignore[attr-defined]
            if self._slot.renew_due():
                await asyncio.to_thread(self._slot.renew_if_due)
            yield chunk
        await asyncio.to_thread(self._slot.release)

    async def aclose(self) -> None:
        """On the loop: close the body (cancels the answer); the slot is released by
        :meth:`close`, which the adapter calls in a thread afterwards."""
        aclose = getattr(self._body, "aclose", None)
        if aclose is not None:
            await aclose()

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._slot.release()


class StreamSlots:
    """At most ``cap`` concurrent streams per owner. ``storage`` returns the limiter's storage
    (or None while limits are off: then nothing is counted). A slot lapses ``lease`` seconds
    after its last renewal; a streaming reply renews it every ``lease / 3`` seconds. ``prefix``
    names the Redis keys: the same mechanism with ``cap=1`` and a thread as the owner
    serialises the replies of one thread, and with a network as the owner caps an address.
    ``in_process`` counts in this process only (a cap on one worker's threads)."""

    def __init__(
        self,
        storage: Callable[[], Any],
        cap: int,
        lease: float,
        prefix: str = "chatkit:streams",
        *,
        in_process: bool = False,
    ) -> None:
        self._storage = storage
        self.cap = cap
        self.prefix = prefix
        self._in_process = in_process  # count here even when the storage is a shared Redis
        self.lease_ms = max(1000, int(lease * 1000))
        self.renew_every = lease / 3
        self._local: defaultdict[str, set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self._scripts: dict[int, tuple[Any, Any, Any]] = {}

    def _redis(self) -> tuple[Any, Any, Any] | None:
        if self._in_process:
            return None
        storage = self._storage()
        if not isinstance(storage, RedisStorage) or isinstance(storage, RedisClusterStorage):
            return None
        scripts = self._scripts.get(id(storage))
        if scripts is None:
            client = storage.get_connection()
            scripts = tuple(client.register_script(s) for s in (_ACQUIRE, _RENEW, _RELEASE))
            self._scripts[id(storage)] = scripts  # type: ignore[assignment]
        return scripts

    def key(self, owner: str) -> str:
        return f"{self.prefix}:{owner}"

    def open_streams(self, owner: str) -> int | None:
        """How many live slots ``owner`` holds now across every worker; None when they are
        counted per process (no Redis: each worker knows only its own). Storage errors
        propagate."""
        if self._storage() is None or self._redis() is None:
            return None
        client = self._storage().get_connection()
        now_ms = int(time.time() * 1000)
        return int(client.zcount(self.key(owner), now_ms, "+inf"))

    def clear(self, owner: str) -> None:
        """Free every slot of ``owner`` (a support case: slots a killed worker left behind
        lapse with their lease anyway). Storage errors propagate."""
        if self._storage() is not None and self._redis() is not None:
            self._storage().get_connection().delete(self.key(owner))

    def acquire(self, owner: str) -> Slot | None:
        """A slot for one reply of ``owner``, or None when they already stream ``cap``."""
        if self._storage() is None:
            return Slot(self, owner, None)
        token = secrets.token_hex(8)
        scripts = self._redis()
        if scripts is not None:
            try:
                taken, lapsed = scripts[0](
                    keys=[self.key(owner)], args=[self.cap, self.lease_ms, token]
                )
            except Exception as exc:  # a storage failure must not refuse the message
                log.warning("chatkit_flask: stream slots unavailable (%s)", type(exc).__name__)
                return Slot(self, owner, None)
            if lapsed:
                # What a worker that died mid-reply (killed, out of memory) leaves behind.
                log.warning(
                    "chatkit_flask: %d %s slot(s) of %s lapsed: their reply stopped renewing "
                    "(its worker died?)",
                    lapsed,
                    self.prefix.rpartition(":")[2],
                    hash_id(owner),
                )
            return Slot(self, owner, token) if taken else None
        with self._lock:
            if len(self._local[owner]) >= self.cap:
                return None
            self._local[owner].add(token)
        return Slot(self, owner, token)

    def _renew(self, slot: Slot) -> None:
        scripts = self._redis()
        if scripts is None:
            return  # in-process slots die with their process: nothing lapses
        try:
            scripts[1](keys=[self.key(slot.owner)], args=[self.lease_ms, slot.token])
        except Exception as exc:  # the next renewal tries again
            log.warning("chatkit_flask: stream slot renewal failed (%s)", type(exc).__name__)

    def _release(self, slot: Slot) -> None:
        scripts = self._redis()
        if scripts is not None:
            try:
                scripts[2](keys=[self.key(slot.owner)], args=[slot.token])
            except Exception as exc:  # the lease lapses the slot anyway
                log.warning("chatkit_flask: stream slot release failed (%s)", type(exc).__name__)
            return
        with self._lock:
            self._local[slot.owner].discard(slot.token)  # type: ignore[arg-type]
            if not self._local[slot.owner]:
                del self._local[slot.owner]
