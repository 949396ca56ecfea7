"""The shared store: threads in Redis, for several hosts (``redis://``, ``rediss://``, ``unix://``).

Keys, under ``key_prefix`` (default ``chatkit:store``):

- ``<prefix>:thread:<thread id>``: hash ``owner``, ``data`` (the thread's JSON), ``created``,
  ``active`` (the last write, ms since the epoch on the Redis clock);
- ``<prefix>:thread:<thread id>:order``: sorted set of item ids scored by creation time;
- ``<prefix>:thread:<thread id>:items``: hash item id -> the item's JSON;
- ``<prefix>:owner:<owner>:threads``: sorted set of the owner's thread ids scored by creation time;
- ``<prefix>:attachment:<attachment id>``: hash ``owner``, ``thread`` ('' until sent), ``data``,
  ``created`` (ms); ``<prefix>:attachments``: every attachment id scored by creation (prune walks
  it); ``<prefix>:owner:<owner>:attachments``: set of the owner's attachment ids (purge, move).
  Attachment keys never expire on their own: :meth:`RedisStore.prune` deletes those whose thread
  is gone, and unsent ones ``thread_ttl`` after their creation.

Scores are microseconds since the epoch; Redis breaks ties by member, so the order is
(created_at, id) and a page after a cursor is ``ZRANK`` + ``ZRANGE``: O(log n + page).
Every write refreshes the TTL of all three keys of its thread, so Redis expires a conversation
natively ``thread_ttl`` seconds after its last write; the owner index lives as long as the owner's
newest thread, and listings drop the ids of threads that expired. A TTL changed later reaches the
stored threads through :meth:`RedisStore.prune`, which re-expires every key from ``active``.
Each operation is one Lua script: the ownership check and the write it guards are atomic, and a
request costs one round trip.

Operators: these keys must never be evicted. Use ``maxmemory-policy noeviction`` or a dedicated
instance (an evicted index hides live threads; an evicted item breaks a conversation).
Redis Cluster is not supported (a script touches a thread's keys and its owner's index).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable

from chatkit.types import Attachment, Page, ThreadItem, ThreadMetadata
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatkit_flask.server.context import RequestContext
from chatkit_flask.server.store import (
    ATTACHMENT_ADAPTER,
    ITEM_ADAPTER,
    OwnerScopedStore,
    StoreUnusable,
    check_page_args,
    make_page,
    mask_url,
    not_found,
    sort_key,
    thread_json,
)

__all__ = ["RedisStore"]

# Write scripts share one layout and this prelude. KEYS: thread, order, items, owner index.
# ARGV: owner, ttl in ms, thread id, then the script's own arguments.
_WRITE_PRELUDE = """
local function owned()
  return redis.call('HGET', KEYS[1], 'owner') == ARGV[1]
end
local function touch()
  local now = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'active', now[1] * 1000 + math.floor(now[2] / 1000))
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
  -- The index must outlive every thread it lists: only ever extend it.
  if redis.call('PTTL', KEYS[4]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[4], ARGV[2])
  end
end
"""

# ARGV[4]: the thread's JSON, ARGV[5]: its score.
_SAVE_THREAD = """
local current = redis.call('HGET', KEYS[1], 'owner')
if current and current ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'data', ARGV[4], 'created', ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[3])
touch()
return 1
"""

# ARGV[4]: item id, ARGV[5]: its score, ARGV[6]: its JSON.
_PUT_ITEM = """
if not owned() then return 0 end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[6])
touch()
return 1
"""

# ARGV[4]: item id.
_DELETE_ITEM = """
if not owned() then return 0 end
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('HDEL', KEYS[3], ARGV[4])
touch()
return 1
"""

_DELETE_THREAD = """
if not owned() then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[3])
return 1
"""

# KEYS: thread, order, items. ARGV: owner, item id. Returns the JSON, or nil.
_LOAD_ITEM = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return false end
return redis.call('HGET', KEYS[3], ARGV[2])
"""

# KEYS: thread, order, items. ARGV: owner, after ('' for none), limit + 1, 'asc' or 'desc'.
# Returns the JSON of up to limit + 1 items, or nil when the thread or the cursor is not found.
_PAGE_ITEMS = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return false end
local asc = ARGV[4] == 'asc'
local start = 0
if ARGV[2] ~= '' then
  local rank = redis.call(asc and 'ZRANK' or 'ZREVRANK', KEYS[2], ARGV[2])
  if not rank then return false end
  start = rank + 1
end
local last = start + tonumber(ARGV[3]) - 1
local ids = redis.call(asc and 'ZRANGE' or 'ZREVRANGE', KEYS[2], start, last)
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[3], unpack(ids))
"""

# KEYS: owner index. ARGV: owner, after ('' for none), wanted (limit + 1, or 0 for all),
# 'asc' or 'desc', thread key prefix. Returns the JSON of up to `wanted` live threads, or nil
# when the cursor is not in the index. Ids of expired threads are removed from the index.
_PAGE_THREADS = """
local index, owner, wanted, asc = KEYS[1], ARGV[1], tonumber(ARGV[3]), ARGV[4] == 'asc'
local start = 0
if ARGV[2] ~= '' then
  local rank = redis.call(asc and 'ZRANK' or 'ZREVRANK', index, ARGV[2])
  if not rank then return false end
  start = rank + 1
end
local batch = wanted > 0 and wanted or 100
local found = {}
while wanted == 0 or #found < wanted do
  local ids = redis.call(asc and 'ZRANGE' or 'ZREVRANGE', index, start, start + batch - 1)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local thread = redis.call('HMGET', ARGV[5] .. id, 'owner', 'data')
    if thread[1] == owner then
      if wanted == 0 or #found < wanted then found[#found + 1] = thread[2] end
    else
      redis.call('ZREM', index, id)  -- expired: later ids move up one rank
      start = start - 1
    end
  end
  start = start + #ids
end
return found
"""

# KEYS: owner index. ARGV: owner, thread key prefix. Returns the number of live threads deleted.
_PURGE_OWNER = """
local deleted = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[2] .. id
  if redis.call('HGET', key, 'owner') == ARGV[1] then
    redis.call('DEL', key, key .. ':order', key .. ':items')
    deleted = deleted + 1
  end
end
redis.call('DEL', KEYS[1])
return deleted
"""

# KEYS: the source's index, the target's index. ARGV: source, target, thread key prefix.
# Returns the number of live threads moved.
_MOVE_OWNER = """
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local moved, longest, extend = 0, redis.call('PTTL', KEYS[2]), false
for i = 1, #entries, 2 do
  local key = ARGV[3] .. entries[i]
  if redis.call('HGET', key, 'owner') == ARGV[1] then
    redis.call('HSET', key, 'owner', ARGV[2])
    redis.call('ZADD', KEYS[2], entries[i + 1], entries[i])
    local ttl = redis.call('PTTL', key)
    if ttl > longest then longest, extend = ttl, true end
    moved = moved + 1
  end
end
redis.call('DEL', KEYS[1])
if extend then redis.call('PEXPIRE', KEYS[2], longest) end
return moved
"""

# KEYS: an owner's index. ARGV: owner, ttl in ms, thread key prefix, now in ms ('': the Redis
# clock). Deletes the owner's threads last written a TTL or more ago, re-expires the others
# from their last write and the index with the newest; returns how many were deleted.
_PRUNE_OWNER = """
local now = tonumber(ARGV[4])
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000 + math.floor(t[2] / 1000)
end
local ttl, pruned, latest = tonumber(ARGV[2]), 0, 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[3] .. id
  local thread = redis.call('HMGET', key, 'owner', 'active', 'created')
  if thread[1] ~= ARGV[1] then
    redis.call('ZREM', KEYS[1], id)  -- expired already (or the id is someone else's now)
  else
    local active = tonumber(thread[2])
    if not active then  -- written before 'active' was kept: its newest item, or its creation
      active = math.floor(tonumber(thread[3]) / 1000)
      local newest = redis.call('ZRANGE', key .. ':order', -1, -1, 'WITHSCORES')
      if newest[2] then active = math.max(active, math.floor(tonumber(newest[2]) / 1000)) end
    end
    local expires = active + ttl
    if expires <= now then
      redis.call('DEL', key, key .. ':order', key .. ':items')
      redis.call('ZREM', KEYS[1], id)
      pruned = pruned + 1
    else
      for _, k in ipairs({key, key .. ':order', key .. ':items'}) do
        redis.call('PEXPIREAT', k, expires)
      end
      if expires > latest then latest = expires end
    end
  end
end
if latest > 0 then redis.call('PEXPIREAT', KEYS[1], latest) else redis.call('DEL', KEYS[1]) end
return pruned
"""

# KEYS: attachment, index, owner's attachment set, thread ('' when unsent). ARGV: owner, id,
# thread id, JSON. Returns 0 when the attachment or the thread is another owner's.
_SAVE_ATTACHMENT = """
local current = redis.call('HGET', KEYS[1], 'owner')
if current and current ~= ARGV[1] then return 0 end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[4], 'owner') ~= ARGV[1] then return 0 end
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSETNX', KEYS[1], 'created', ms)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'thread', ARGV[3], 'data', ARGV[4])
redis.call('ZADD', KEYS[2], 'NX', ms, ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""

# KEYS: attachment, index, owner's set. ARGV: owner, id.
_DELETE_ATTACHMENT = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[2])
return 1
"""

# KEYS: owner's set, index. ARGV: owner, attachment key prefix.
_PURGE_ATTACHMENTS = """
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. id
  if redis.call('HGET', key, 'owner') == ARGV[1] then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[2], id)
  end
end
redis.call('DEL', KEYS[1])
return 0
"""

# KEYS: source's set, target's set. ARGV: source, target, attachment key prefix.
_MOVE_ATTACHMENTS = """
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[3] .. id
  if redis.call('HGET', key, 'owner') == ARGV[1] then
    redis.call('HSET', key, 'owner', ARGV[2])
    redis.call('SADD', KEYS[2], id)
  end
end
redis.call('DEL', KEYS[1])
return 0
"""

# KEYS: index. ARGV: ttl in ms, now in ms ('': the Redis clock), attachment key prefix, thread
# key prefix, owner key prefix, then attachment ids. Deletes those whose thread is gone and
# unsent ones created a TTL or more ago; returns how many.
_PRUNE_ATTACHMENTS = """
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000 + math.floor(t[2] / 1000)
end
local pruned = 0
for i = 6, #ARGV do
  local id = ARGV[i]
  local key = ARGV[3] .. id
  local a = redis.call('HMGET', key, 'owner', 'thread', 'created')
  local gone = a[1] == false
  if not gone and a[2] ~= '' then
    gone = redis.call('HGET', ARGV[4] .. a[2], 'owner') ~= a[1]
  elseif not gone then
    gone = tonumber(a[3]) + tonumber(ARGV[1]) <= now
  end
  if gone then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], id)
    if a[1] then redis.call('SREM', ARGV[5] .. a[1] .. ':attachments', id) end
    pruned = pruned + 1
  end
end
return pruned
"""

_SCRIPTS = {
    "save_attachment": _SAVE_ATTACHMENT,
    "delete_attachment": _DELETE_ATTACHMENT,
    "purge_attachments": _PURGE_ATTACHMENTS,
    "move_attachments": _MOVE_ATTACHMENTS,
    "prune_attachments": _PRUNE_ATTACHMENTS,
    "save_thread": _WRITE_PRELUDE + _SAVE_THREAD,
    "put_item": _WRITE_PRELUDE + _PUT_ITEM,
    "delete_item": _WRITE_PRELUDE + _DELETE_ITEM,
    "delete_thread": _WRITE_PRELUDE + _DELETE_THREAD,
    "load_item": _LOAD_ITEM,
    "page_items": _PAGE_ITEMS,
    "page_threads": _PAGE_THREADS,
    "purge_owner": _PURGE_OWNER,
    "move_owner": _MOVE_OWNER,
    "prune_owner": _PRUNE_OWNER,
}


# Seconds a store command may wait for Redis unless the URL says otherwise
# (redis://host/0?socket_timeout=1.5): well inside a request's own deadlines (30 s for a read,
# CHATKIT_MODEL_TIMEOUT for a reply), so a hung Redis is a quick 503, not a hung worker thread.
DEFAULT_TIMEOUT = 3.0


def persistence_findings(url: str, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """What would make the store's Redis lose threads, in words an operator can act on: no
    persistence (a restart loses every thread) or an eviction policy (Redis drops threads when
    full). Empty when both are safe, or when Redis cannot be reached (start-up's store probe
    reports that). ``CONFIG GET`` first; a managed Redis that disables it is read from ``INFO``.
    """
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        try:
            config = {**client.config_get("appendonly"), **client.config_get("save")}
            config.update(client.config_get("maxmemory-policy"))
            aof = config.get("appendonly") == "yes"
            rdb: bool | None = bool((config.get("save") or "").strip())
            policy = config.get("maxmemory-policy", "")
        except redis.ResponseError:  # CONFIG renamed or refused (managed Redis)
            info = {**client.info("persistence"), **client.info("memory")}
            aof = bool(info.get("aof_enabled"))
            rdb = None  # INFO does not say whether snapshots are scheduled
            policy = str(info.get("maxmemory_policy", ""))
    except redis.RedisError:
        return []
    finally:
        client.close()
    where = f"the thread store's Redis ({mask_url(url)})"
    findings = []
    if not aof and rdb is False:
        findings.append(
            f"{where} keeps nothing on disk (appendonly no, no save points): a restart of that "
            "Redis loses every thread. Turn on AOF (appendonly yes) or RDB snapshots (save)."
        )
    elif not aof and rdb is None:
        findings.append(
            f"{where} has AOF off and its snapshot schedule cannot be read: a restart may lose "
            "threads. Turn on AOF (appendonly yes)."
        )
    if policy != "noeviction":
        findings.append(
            f"{where} has maxmemory-policy {policy or 'unknown'}: when full it evicts threads "
            "silently. Set maxmemory-policy noeviction (or give the store its own Redis)."
        )
    return findings


def _reconnect_once() -> Retry:
    """One retry on a new connection when a pooled one turns out dead (a Redis restart closes
    every pooled connection; without this each one failed one request with a 503). Only
    connection errors: a timeout is not retried, so a hung Redis still fails within
    ``DEFAULT_TIMEOUT``. The scripts are upserts and deletes, safe to run again."""
    return Retry(ConstantBackoff(0.05), 1, supported_errors=(RedisConnectionError,))


class RedisStore(OwnerScopedStore):
    """Threads and items in the Redis at ``url``.

    The client is created on the event loop that first uses the store, and again when the running
    loop or the process (a gunicorn fork) changes; nothing connects before first use.
    ``client_factory`` replaces ``Redis.from_url`` (tests pass a fakeredis client).
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        thread_ttl: int,
        key_prefix: str = "chatkit:store",
        *,
        client_factory: Callable[[], Redis] | None = None,
    ) -> None:
        super().__init__(thread_ttl)
        self._url = url
        self._prefix = key_prefix
        self._client_factory = client_factory
        self._client: Redis | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._client_pid = 0
        self._scripts: dict[str, AsyncScript] = {}

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self._prefix!r}, thread_ttl={self.thread_ttl})"  # no URL

    async def aclose(self) -> None:
        """Close the client if it belongs to the running loop (at shutdown, and in tests)."""
        if self._client is not None and self._client_loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None

    async def probe(self, *, write: bool) -> None:
        """PING; with ``write``, also set and delete a probe key (a read-only replica, a full
        ``maxmemory`` or a user without write rights would fail every answer)."""
        try:
            client = self._redis()
            await client.ping()
            if write:
                key = f"{self._prefix}:probe:{secrets.token_hex(8)}"
                await client.set(key, b"1", px=10_000)
                await client.delete(key)
        except RedisError as exc:
            raise _unusable(exc) from None

    # -- ChatKit Store --------------------------------------------------------------------------

    async def load_thread(self, thread_id: str, context: RequestContext) -> ThreadMetadata:
        owner, data = await self._redis().hmget(self._thread_key(thread_id), ["owner", "data"])
        if owner is None or owner.decode() != context.owner:
            not_found("thread", thread_id)
        return ThreadMetadata.model_validate_json(data)

    async def save_thread(self, thread: ThreadMetadata, context: RequestContext) -> None:
        created = sort_key(thread.created_at)
        if not await self._write(
            "save_thread", thread.id, context.owner, thread_json(thread), created
        ):
            not_found("thread", thread.id)

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: RequestContext
    ) -> Page[ThreadMetadata]:
        limit = check_page_args(limit, order)
        rows = await self._page_threads(context.owner, after, limit + 1, order)
        if rows is None:
            not_found("thread", str(after))
        return make_page([ThreadMetadata.model_validate_json(row) for row in rows], limit)

    async def delete_thread(self, thread_id: str, context: RequestContext) -> None:
        if not await self._write("delete_thread", thread_id, context.owner):
            not_found("thread", thread_id)

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: RequestContext
    ) -> Page[ThreadItem]:
        limit = check_page_args(limit, order)
        rows = await self._script("page_items")(
            keys=self._thread_keys(thread_id)[:3],
            args=[context.owner, after or "", limit + 1, order],
        )
        if rows is None:
            not_found("thread or item", f"{thread_id}/{after}")
        items = [ITEM_ADAPTER.validate_json(row) for row in rows if row is not None]
        return make_page(items, limit)

    async def add_thread_item(
        self, thread_id: str, item: ThreadItem, context: RequestContext
    ) -> None:
        await self._put_item(thread_id, item, context.owner)

    async def save_item(self, thread_id: str, item: ThreadItem, context: RequestContext) -> None:
        await self._put_item(thread_id, item, context.owner)

    async def load_item(self, thread_id: str, item_id: str, context: RequestContext) -> ThreadItem:
        row = await self._script("load_item")(
            keys=self._thread_keys(thread_id)[:3], args=[context.owner, item_id]
        )
        if row is None:
            not_found("item", item_id)
        return ITEM_ADAPTER.validate_json(row)

    async def delete_thread_item(
        self, thread_id: str, item_id: str, context: RequestContext
    ) -> None:
        if not await self._write("delete_item", thread_id, context.owner, item_id):
            not_found("thread", thread_id)

    async def save_attachment(self, attachment: Attachment, context: RequestContext) -> None:
        thread = attachment.thread_id or ""
        done = await self._script("save_attachment")(
            keys=[
                self._attachment_key(attachment.id),
                self._attachment_index(),
                self._owner_attachments_key(context.owner),
                self._thread_key(thread) if thread else "",
            ],
            args=[context.owner, attachment.id, thread, attachment.model_dump_json()],
        )
        if not done:
            not_found("attachment", attachment.id)

    async def load_attachment(self, attachment_id: str, context: RequestContext) -> Attachment:
        owner, data = await self._redis().hmget(
            self._attachment_key(attachment_id), ["owner", "data"]
        )
        if owner is None or owner.decode() != context.owner:
            not_found("attachment", attachment_id)
        return ATTACHMENT_ADAPTER.validate_json(data)

    async def delete_attachment(self, attachment_id: str, context: RequestContext) -> None:
        await self._script("delete_attachment")(
            keys=[
                self._attachment_key(attachment_id),
                self._attachment_index(),
                self._owner_attachments_key(context.owner),
            ],
            args=[context.owner, attachment_id],
        )

    # -- owner-wide operations ------------------------------------------------------------------

    async def known_attachments(self, attachment_ids: list[str]) -> set[str]:
        known: set[str] = set()
        for start in range(0, len(attachment_ids), 500):
            batch = attachment_ids[start : start + 500]
            scores = await self._redis().zmscore(self._attachment_index(), batch)
            known.update(i for i, score in zip(batch, scores, strict=True) if score is not None)
        return known

    async def owner_attachments(self, owner: str) -> list[str]:
        members = await self._redis().smembers(self._owner_attachments_key(owner))
        return sorted(m.decode() for m in members)

    async def list_owner_threads(self, owner: str) -> list[ThreadMetadata]:
        rows = await self._page_threads(owner, None, 0, "asc")
        return [ThreadMetadata.model_validate_json(row) for row in rows or []]

    async def purge_owner(self, owner: str) -> int:
        deleted = await self._script("purge_owner")(
            keys=[self._owner_key(owner)], args=[owner, f"{self._prefix}:thread:"]
        )
        await self._script("purge_attachments")(
            keys=[self._owner_attachments_key(owner), self._attachment_index()],
            args=[owner, f"{self._prefix}:attachment:"],
        )
        return int(deleted)

    async def move_owner(self, source: str, target: str) -> int:
        moved = await self._script("move_owner")(
            keys=[self._owner_key(source), self._owner_key(target)],
            args=[source, target, f"{self._prefix}:thread:"],
        )
        await self._script("move_attachments")(
            keys=[self._owner_attachments_key(source), self._owner_attachments_key(target)],
            args=[source, target, f"{self._prefix}:attachment:"],
        )
        return int(moved)

    async def prune(self, now: float | None = None) -> int:
        """One script per owner (each atomic); threads written meanwhile keep their new TTL."""
        head, tail = f"{self._prefix}:owner:", ":threads"
        stamp = "" if now is None else int(now * 1000)
        pruned = 0
        async for raw in self._redis().scan_iter(match=f"{head}*{tail}", count=500):
            key = raw.decode()
            owner = key[len(head) : -len(tail)]
            pruned += int(
                await self._script("prune_owner")(
                    keys=[key],
                    args=[owner, self.thread_ttl * 1000, f"{self._prefix}:thread:", stamp],
                )
            )
        await self._prune_attachments(stamp)
        return pruned

    async def _prune_attachments(self, stamp: int | str) -> None:
        """Attachments whose thread is gone (expired natively or pruned), and unsent old ones."""
        ids = [raw.decode() for raw in await self._redis().zrange(self._attachment_index(), 0, -1)]
        for start in range(0, len(ids), 500):
            await self._script("prune_attachments")(
                keys=[self._attachment_index()],
                args=[
                    self.thread_ttl * 1000, stamp, f"{self._prefix}:attachment:",
                    f"{self._prefix}:thread:", f"{self._prefix}:owner:", *ids[start : start + 500],
                ],
            )  # fmt: skip

    # -- keys and scripts -------------------------------------------------------------------------

    def _thread_key(self, thread_id: str) -> str:
        return f"{self._prefix}:thread:{thread_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self._prefix}:owner:{owner}:threads"

    def _attachment_key(self, attachment_id: str) -> str:
        return f"{self._prefix}:attachment:{attachment_id}"

    def _attachment_index(self) -> str:
        return f"{self._prefix}:attachments"

    def _owner_attachments_key(self, owner: str) -> str:
        return f"{self._prefix}:owner:{owner}:attachments"

    def _thread_keys(self, thread_id: str, owner: str = "") -> list[str]:
        thread = self._thread_key(thread_id)
        return [thread, f"{thread}:order", f"{thread}:items", self._owner_key(owner)]

    async def _put_item(self, thread_id: str, item: ThreadItem, owner: str) -> None:
        created = sort_key(item.created_at)
        if not await self._write(
            "put_item", thread_id, owner, item.id, created, item.model_dump_json()
        ):
            not_found("thread", thread_id)

    async def _write(self, script: str, thread_id: str, owner: str, *args: str | int) -> bool:
        """Run a write script; False when the thread is another owner's (or missing)."""
        done = await self._script(script)(
            keys=self._thread_keys(thread_id, owner),
            args=[owner, self.thread_ttl * 1000, thread_id, *args],
        )
        return bool(done)

    async def _page_threads(
        self, owner: str, after: str | None, wanted: int, order: str
    ) -> list[bytes] | None:
        return await self._script("page_threads")(
            keys=[self._owner_key(owner)],
            args=[owner, after or "", wanted, order, f"{self._prefix}:thread:"],
        )

    def _script(self, name: str) -> AsyncScript:
        self._redis()
        return self._scripts[name]

    def _redis(self) -> Redis:
        """The client for the running loop in this process (a client is bound to the loop that
        created its connections, and connections must not cross a fork)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop or self._client_pid != os.getpid():
            if self._client_factory is not None:
                client = self._client_factory()
            else:
                # URL query options (?socket_timeout=...) take precedence over these defaults.
                client = Redis.from_url(
                    self._url,
                    socket_connect_timeout=DEFAULT_TIMEOUT,
                    socket_timeout=DEFAULT_TIMEOUT,
                    retry=_reconnect_once(),
                )
            self._scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}
            self._client, self._client_loop, self._client_pid = client, loop, os.getpid()
        return self._client


def _unusable(exc: RedisError) -> StoreUnusable:
    """Why Redis refused, without its message when that could quote a URL or a key."""
    if isinstance(exc, AuthenticationError):
        return StoreUnusable("Redis refused the credentials (authentication failed)", "refused")
    if isinstance(exc, RedisTimeoutError):
        return StoreUnusable("Redis did not answer in time (timeout)", "timeout")
    if isinstance(exc, RedisConnectionError):
        # redis-py says "Error 111 connecting to host:port. Connection refused.": no password.
        return StoreUnusable(f"cannot connect to Redis: {exc}", "unreachable")
    if isinstance(exc, ResponseError):
        first = str(exc).split(" ", 1)[0]  # READONLY, OOM, NOPERM, NOAUTH, ...
        causes = {
            "READONLY": "Redis is a read-only replica",
            "OOM": "Redis is out of memory (maxmemory reached)",
            "NOPERM": "the Redis user may not run the store's commands (ACL)",
            "NOAUTH": "Redis needs a password (authentication required)",
        }
        cause = causes.get(first, f"Redis answered an error ({first})")
        return StoreUnusable(cause, "refused")
    return StoreUnusable(f"Redis failed ({type(exc).__name__})", "unavailable")
