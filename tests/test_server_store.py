"""The store contract, checked against every store: SQLite (a temporary file), fakeredis, the
real Redis (database 13 of the suite's own ``redis-server``) and the SQL store on the suite's own
PostgreSQL and MariaDB (their tables made by the migrations, emptied before each test) and on
aiosqlite.

Each test runs its scenario with ``asyncio.run``, as the background loop of a worker would.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, get_args

import fakeredis
import pytest
import redis
import redis.asyncio
from chatkit.server import ChatKitServer, StreamingResult
from chatkit.store import NotFoundError, StoreItemType, default_generate_id
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageItem,
    ClosedStatus,
    FileAttachment,
    InferenceOptions,
    Page,
    Thread,
    ThreadItem,
    ThreadItemDoneEvent,
    ThreadMetadata,
    ThreadStreamEvent,
    UserMessageItem,
    UserMessageTextContent,
)
from fakeredis import aioredis as fake_aioredis

from chatkit_flask.server.context import RequestContext
from chatkit_flask.server.sql_schema import upgrade
from chatkit_flask.server.store import OwnerScopedStore, open_store, sql_database
from chatkit_flask.server.store_redis import RedisStore
from chatkit_flask.server.store_sql import SQLStore
from chatkit_flask.server.store_sqlite import SQLiteStore
from chatkit_flask.settings import ConfigError
from tests.services import MYSQL_URL, POSTGRES_URL, SUITE_REDIS

REDIS_URL = SUITE_REDIS.url(13)
PREFIX = "test:store"
T = TypeVar("T")

ALICE = RequestContext(owner="visitor:alice")
BOB = RequestContext(owner="user:bob")
T0 = datetime(2026, 11, 26, 12, 0, 0)  # naive, like the SDK's datetime.now()


# -- models, built the way the SDK builds them ----------------------------------------------------


def thread(thread_id: str, created: datetime = T0, title: str | None = None) -> ThreadMetadata:
    return ThreadMetadata(id=thread_id, created_at=created, title=title)


def user_message(thread_id: str, item_id: str, text: str, created: datetime = T0) -> ThreadItem:
    return UserMessageItem(
        id=item_id,
        thread_id=thread_id,
        created_at=created,
        content=[UserMessageTextContent(text=text)],
        attachments=[],
        quoted_text=None,
        inference_options=InferenceOptions(),
    )


def assistant_message(
    thread_id: str, item_id: str, text: str, created: datetime = T0
) -> ThreadItem:
    return AssistantMessageItem(
        id=item_id,
        thread_id=thread_id,
        created_at=created,
        content=[AssistantMessageContent(text=text)],
    )


def texts(items: list[ThreadItem]) -> list[str]:
    return [item.content[0].text for item in items]  # type: ignore[union-attr]


# -- backends -------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """Makes stores of one kind and runs scenarios against them on a fresh event loop."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.clock = FakeClock()
        self._db = tmp_path / "chatkit.db"
        self._fake_server = fakeredis.FakeServer()
        self._stores: list[OwnerScopedStore] = []
        self.sql_sqlite_url = f"sqlite+aiosqlite:///{tmp_path}/chatkit-sql.db"
        if name == "aiosqlite":
            upgrade(self.sql_sqlite_url)

    @property
    def is_redis(self) -> bool:
        return self.name in ("fakeredis", "redis")

    def make(self, thread_ttl: int = 3600) -> OwnerScopedStore:
        store: OwnerScopedStore
        if self.name == "sqlite":
            store = SQLiteStore(self._db, thread_ttl, clock=self.clock)
        elif self.name == "postgres":
            store = SQLStore(POSTGRES_URL, thread_ttl, clock=self.clock)
        elif self.name == "mysql":
            store = SQLStore(MYSQL_URL, thread_ttl, clock=self.clock)
        elif self.name == "aiosqlite":  # the SQL store's code path on SQLite
            store = SQLStore(self.sql_sqlite_url, thread_ttl, clock=self.clock)
        elif self.name == "fakeredis":
            store = RedisStore("redis://fake", thread_ttl, PREFIX, client_factory=self.raw_client)
        else:
            store = RedisStore(REDIS_URL, thread_ttl, PREFIX)
        self._stores.append(store)
        return store

    def raw_client(self) -> redis.asyncio.Redis:
        if self.name == "fakeredis":
            return fake_aioredis.FakeRedis(server=self._fake_server)
        return redis.asyncio.Redis.from_url(REDIS_URL)

    async def let_time_pass(self, seconds: float) -> None:
        # SQLite and SQL read a clock we own; Redis expires keys on its own clock.
        if self.is_redis:
            await asyncio.sleep(seconds)
        else:
            self.clock.now += seconds

    def run(self, scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
        async def main() -> T:
            try:
                return await scenario()
            finally:
                for store in self._stores:
                    if isinstance(store, RedisStore | SQLStore):
                        await store.aclose()

        return asyncio.run(main())


def _backend(request: pytest.FixtureRequest, name: str, tmp_path: Path) -> Iterator[Backend]:
    if name in ("postgres", "mysql"):
        request.getfixturevalue(f"{name}_tables")
        yield Backend(name, tmp_path)
        return
    if name != "redis":
        yield Backend(name, tmp_path)
        return
    request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield Backend(name, tmp_path)
    client.flushdb()
    client.close()


POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)
MYSQL = pytest.param("mysql", marks=pytest.mark.mysql)


@pytest.fixture(
    params=[
        "sqlite", "fakeredis", pytest.param("redis", marks=pytest.mark.redis), POSTGRES, MYSQL,
        "aiosqlite",
    ]
)  # fmt: skip
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request, request.param, tmp_path)


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request, request.param, tmp_path)


async def collect_pages(
    fetch: Callable[[str | None], Awaitable[Page[Any]]],
) -> list[tuple[list[str], bool, str | None]]:
    """Follow ``after`` cursors from the first page to the last: (ids, has_more, after) per page."""
    pages: list[tuple[list[str], bool, str | None]] = []
    after: str | None = None
    while True:
        page = await fetch(after)
        pages.append(([record.id for record in page.data], page.has_more, page.after))
        if not page.has_more:
            return pages
        after = page.after
        assert len(pages) < 20, "paging does not end"


# -- the contract ---------------------------------------------------------------------------------


def test_threads_and_items_round_trip(backend: Backend) -> None:
    store = backend.make()
    meta = ThreadMetadata(
        id="thr_round",
        created_at=T0,
        title="Trip to Lisbon",
        status=ClosedStatus(reason="done"),
        metadata={"topic": "travel", "turns": 2},
    )
    question = user_message("thr_round", "msg_q", "Where should I eat?", T0)
    answer = assistant_message("thr_round", "msg_a", "Try the bakery.", T0 + timedelta(seconds=1))

    async def scenario() -> None:
        await store.save_thread(meta, ALICE)
        await store.add_thread_item("thr_round", question, ALICE)
        await store.add_thread_item("thr_round", answer, ALICE)

        loaded = await store.load_thread("thr_round", ALICE)
        assert loaded == meta
        page = await store.load_thread_items("thr_round", None, 20, "asc", ALICE)
        assert page.data == [question, answer]
        assert (page.has_more, page.after) == (False, None)
        assert isinstance(page.data[0], UserMessageItem)
        assert isinstance(page.data[1], AssistantMessageItem)
        assert await store.load_item("thr_round", "msg_a", ALICE) == answer
        listed = await store.load_threads(20, None, "desc", ALICE)
        assert listed.data == [meta]

    backend.run(scenario)


def test_a_full_thread_is_stored_as_its_metadata(backend: Backend) -> None:
    # ChatKitServer passes the Thread it streams (with its items page) to save_thread.
    store = backend.make()
    full = Thread(id="thr_full", created_at=T0, title="t", items=Page(data=[]))

    async def scenario() -> None:
        await store.save_thread(full, ALICE)
        loaded = await store.load_thread("thr_full", ALICE)
        assert type(loaded) is ThreadMetadata
        assert loaded == ThreadMetadata(id="thr_full", created_at=T0, title="t")

    backend.run(scenario)


def test_another_owners_thread_and_items_are_not_found(backend: Backend) -> None:
    store = backend.make()
    secret = "Alice's private question"

    async def scenario() -> None:
        await store.save_thread(thread("thr_alice", title="Alice's"), ALICE)
        await store.add_thread_item("thr_alice", user_message("thr_alice", "msg_1", secret), ALICE)
        await store.save_thread(thread("thr_bob"), BOB)

        intruder = user_message("thr_alice", "msg_1", "overwritten by Bob")
        attempts: list[Awaitable[Any]] = [
            store.load_thread("thr_alice", BOB),
            store.save_thread(thread("thr_alice", title="Bob's now"), BOB),
            store.load_thread_items("thr_alice", None, 20, "asc", BOB),
            store.load_item("thr_alice", "msg_1", BOB),
            store.save_item("thr_alice", intruder, BOB),
            store.add_thread_item("thr_alice", intruder, BOB),
            store.delete_thread_item("thr_alice", "msg_1", BOB),
            store.delete_thread("thr_alice", BOB),
            # Alice's ids are no cursor for Bob, not even into his own thread.
            store.load_threads(20, "thr_alice", "asc", BOB),
            store.load_thread_items("thr_bob", "msg_1", 20, "asc", BOB),
        ]
        for attempt in attempts:
            with pytest.raises(NotFoundError) as raised:
                await attempt
            assert secret not in str(raised.value)

        assert [t.id for t in (await store.load_threads(20, None, "asc", BOB)).data] == ["thr_bob"]
        assert await store.list_owner_threads(BOB.owner) == [thread("thr_bob")]
        # Nothing Bob tried changed Alice's thread.
        assert (await store.load_thread("thr_alice", ALICE)).title == "Alice's"
        items = (await store.load_thread_items("thr_alice", None, 20, "asc", ALICE)).data
        assert texts(items) == [secret]

    backend.run(scenario)


def test_ids_and_owners_compare_exactly(backend: Backend) -> None:
    """Case makes another owner and another id (MySQL's default collations ignore it; the
    tables declare a binary one), and ids sort by their characters."""
    store = backend.make()
    alice_upper = RequestContext(owner="visitor:ALICE")

    async def scenario() -> None:
        await store.save_thread(thread("thr_a", title="lower"), ALICE)
        await store.save_thread(thread("thr_A", title="upper"), ALICE)
        for attempt in (
            store.load_thread("thr_a", alice_upper),
            store.save_thread(thread("thr_a", title="taken"), alice_upper),
            store.load_thread_items("thr_a", None, 20, "asc", alice_upper),
        ):
            with pytest.raises(NotFoundError):
                await attempt
        assert (await store.load_threads(20, None, "asc", alice_upper)).data == []
        assert await store.purge_owner(alice_upper.owner) == 0
        listed = (await store.load_threads(20, None, "asc", ALICE)).data  # equal creation times
        assert [(t.id, t.title) for t in listed] == [("thr_A", "upper"), ("thr_a", "lower")]
        await store.add_thread_item("thr_a", user_message("thr_a", "msg_x", "lower"), ALICE)
        await store.add_thread_item("thr_a", user_message("thr_a", "msg_X", "upper"), ALICE)
        items = (await store.load_thread_items("thr_a", None, 20, "asc", ALICE)).data
        assert [(item.id, text) for item, text in zip(items, texts(items), strict=True)] == [
            ("msg_X", "upper"), ("msg_x", "lower")
        ]  # fmt: skip

    backend.run(scenario)


def test_long_answers_and_any_character_come_back_as_written(backend: Backend) -> None:
    """Beyond MySQL's 64 KB TEXT, with characters outside the BMP (utf8mb4, not utf8mb3)."""
    store = backend.make()
    long_text = "Ol\u00e1 \U0001f600 \u6f22\u5b57 \U0001d11e " * 4000  # ~100 KB in UTF-8
    answer = assistant_message("thr_long", "msg_long", long_text)

    async def scenario() -> None:
        await store.save_thread(thread("thr_long", title="\U0001f4ac chat"), ALICE)
        await store.add_thread_item("thr_long", answer, ALICE)
        assert (await store.load_thread("thr_long", ALICE)).title == "\U0001f4ac chat"
        assert await store.load_item("thr_long", "msg_long", ALICE) == answer

    assert len(long_text.encode()) > 65_535
    backend.run(scenario)


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_items_page_by_creation_in_both_orders(backend: Backend, order: str) -> None:
    store = backend.make()
    items = [
        assistant_message("thr_p", f"msg_{i}", f"reply {i}", T0 + timedelta(seconds=i))
        for i in range(7)
    ]
    shuffled = random.Random(7).sample(items, len(items))  # creation time decides, not arrival
    ids = [f"msg_{i}" for i in range(7)]
    if order == "desc":
        ids.reverse()

    async def scenario() -> None:
        await store.save_thread(thread("thr_p"), ALICE)
        for item in shuffled:
            await store.add_thread_item("thr_p", item, ALICE)
        pages = await collect_pages(
            lambda after: store.load_thread_items("thr_p", after, 3, order, ALICE)
        )
        assert pages == [
            (ids[0:3], True, ids[2]),
            (ids[3:6], True, ids[5]),
            (ids[6:7], False, None),
        ]

    backend.run(scenario)


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_threads_page_by_creation_in_both_orders(backend: Backend, order: str) -> None:
    store = backend.make()
    ids = [f"thr_{i}" for i in range(7)]
    if order == "desc":
        ids.reverse()

    async def scenario() -> None:
        for i in random.Random(3).sample(range(7), 7):
            await store.save_thread(thread(f"thr_{i}", T0 + timedelta(minutes=i)), ALICE)
            await store.save_thread(thread(f"thr_bob_{i}", T0 + timedelta(minutes=i)), BOB)
        pages = await collect_pages(lambda after: store.load_threads(3, after, order, ALICE))
        assert pages == [
            (ids[0:3], True, ids[2]),
            (ids[3:6], True, ids[5]),
            (ids[6:7], False, None),
        ]

    backend.run(scenario)


def test_equal_creation_times_page_without_gaps_or_repeats(backend: Backend) -> None:
    store = backend.make()

    async def scenario() -> None:
        await store.save_thread(thread("thr_tie"), ALICE)
        for i in range(5):
            await store.add_thread_item("thr_tie", user_message("thr_tie", f"msg_{i}", "x"), ALICE)
        page = await store.load_thread_items("thr_tie", None, 10, "asc", ALICE)
        whole = [item.id for item in page.data]
        assert sorted(whole) == [f"msg_{i}" for i in range(5)]
        for order, expected in (("asc", whole), ("desc", whole[::-1])):

            def fetch(after: str | None, order: str = order) -> Awaitable[Page[ThreadItem]]:
                return store.load_thread_items("thr_tie", after, 2, order, ALICE)

            pages = await collect_pages(fetch)
            assert [item_id for ids, _, _ in pages for item_id in ids] == expected

    backend.run(scenario)


def test_saves_upsert(backend: Backend) -> None:
    store = backend.make()

    async def scenario() -> None:
        await store.save_thread(thread("thr_u", title="draft"), ALICE)
        await store.save_thread(thread("thr_u", title="final"), ALICE)
        await store.add_thread_item("thr_u", assistant_message("thr_u", "msg_a", "Hel"), ALICE)
        await store.save_item("thr_u", assistant_message("thr_u", "msg_a", "Hello!"), ALICE)
        await store.save_item("thr_u", assistant_message("thr_u", "msg_b", "new"), ALICE)

        threads = (await store.load_threads(20, None, "asc", ALICE)).data
        assert [(t.id, t.title) for t in threads] == [("thr_u", "final")]
        items = (await store.load_thread_items("thr_u", None, 20, "asc", ALICE)).data
        assert [(i.id, t) for i, t in zip(items, texts(items), strict=True)] == [
            ("msg_a", "Hello!"),
            ("msg_b", "new"),
        ]

    backend.run(scenario)


def test_deletes(backend: Backend) -> None:
    store = backend.make()

    async def scenario() -> None:
        for thread_id in ("thr_gone", "thr_kept"):
            await store.save_thread(thread(thread_id), ALICE)
            for i in range(2):
                item = user_message(thread_id, f"msg_{i}", f"{thread_id} {i}")
                await store.add_thread_item(thread_id, item, ALICE)

        await store.delete_thread("thr_gone", ALICE)
        for read in (
            store.load_thread("thr_gone", ALICE),
            store.load_thread_items("thr_gone", None, 20, "asc", ALICE),
            store.load_item("thr_gone", "msg_0", ALICE),
            store.delete_thread("thr_gone", ALICE),
        ):
            with pytest.raises(NotFoundError):
                await read
        assert [t.id for t in (await store.load_threads(20, None, "asc", ALICE)).data] == [
            "thr_kept"
        ]

        await store.delete_thread_item("thr_kept", "msg_0", ALICE)
        await store.delete_thread_item("thr_kept", "msg_never", ALICE)  # nothing to do
        with pytest.raises(NotFoundError):
            await store.load_item("thr_kept", "msg_0", ALICE)
        items = (await store.load_thread_items("thr_kept", None, 20, "asc", ALICE)).data
        assert texts(items) == ["thr_kept 1"]

    backend.run(scenario)


def test_threads_expire_when_not_written_for_the_ttl(backend: Backend) -> None:
    store = backend.make(thread_ttl=1)

    async def scenario() -> None:
        await store.save_thread(thread("thr_idle"), ALICE)
        await store.add_thread_item("thr_idle", user_message("thr_idle", "msg_1", "hi"), ALICE)
        await store.save_thread(thread("thr_busy", T0 + timedelta(seconds=1)), ALICE)
        await backend.let_time_pass(0.6)
        # An item written to the busy thread keeps it (and its items) alive.
        await store.add_thread_item("thr_busy", user_message("thr_busy", "msg_2", "yo"), ALICE)
        await backend.let_time_pass(0.6)

        for read in (
            store.load_thread("thr_idle", ALICE),
            store.load_thread_items("thr_idle", None, 20, "asc", ALICE),
            store.load_item("thr_idle", "msg_1", ALICE),
            store.add_thread_item("thr_idle", user_message("thr_idle", "msg_3", "?"), ALICE),
        ):
            with pytest.raises(NotFoundError):
                await read
        assert [t.id for t in (await store.load_threads(20, None, "asc", ALICE)).data] == [
            "thr_busy"
        ]
        assert [t.id for t in await store.list_owner_threads(ALICE.owner)] == ["thr_busy"]
        assert texts((await store.load_thread_items("thr_busy", None, 20, "asc", ALICE)).data) == [
            "yo"
        ]

        # An expired id saved again starts empty: the old items do not come back.
        await store.save_thread(thread("thr_idle"), ALICE)
        assert (await store.load_thread_items("thr_idle", None, 20, "asc", ALICE)).data == []

        await backend.let_time_pass(0.6)
        with pytest.raises(NotFoundError):
            await store.load_thread("thr_busy", ALICE)

    backend.run(scenario)


def test_listings_skip_expired_threads_between_live_ones(backend: Backend) -> None:
    store = backend.make(thread_ttl=1)
    created = {f"thr_{i}": T0 + timedelta(minutes=i) for i in range(8)}
    live = [thread_id for i, thread_id in enumerate(created) if i % 2]

    async def scenario() -> None:
        for thread_id, at in created.items():
            await store.save_thread(thread(thread_id, at), ALICE)
        await backend.let_time_pass(0.6)
        for thread_id in live:
            await store.save_thread(thread(thread_id, created[thread_id], "kept"), ALICE)
        await backend.let_time_pass(0.6)

        # The first pass meets the expired ids (Redis drops them from its index as it goes).
        for limit, order in ((2, "asc"), (1, "desc"), (3, "asc")):

            def fetch(after: str | None, limit: int = limit, order: str = order) -> Any:
                return store.load_threads(limit, after, order, ALICE)

            pages = await collect_pages(fetch)
            listed = [thread_id for ids, _, _ in pages for thread_id in ids]
            assert listed == (live if order == "asc" else live[::-1]), (limit, order)

    backend.run(scenario)


def test_an_expired_id_taken_by_another_owner_stays_theirs(backend: Backend) -> None:
    store = backend.make(thread_ttl=1)

    async def scenario() -> None:
        await store.save_thread(thread("thr_reused", title="Alice's"), ALICE)
        await backend.let_time_pass(0.6)
        await store.save_thread(thread("thr_alive"), ALICE)  # her thread list stays alive
        await backend.let_time_pass(0.6)
        await store.save_thread(thread("thr_reused", title="Bob's"), BOB)
        await store.add_thread_item("thr_reused", user_message("thr_reused", "msg", "b"), BOB)

        # Purging Alice deletes her live thread only (her list may still hold the old id).
        assert await store.purge_owner(ALICE.owner) == 1
        assert await store.list_owner_threads(ALICE.owner) == []
        with pytest.raises(NotFoundError):
            await store.load_thread("thr_reused", ALICE)
        assert (await store.load_thread("thr_reused", BOB)).title == "Bob's"
        items = (await store.load_thread_items("thr_reused", None, 20, "asc", BOB)).data
        assert texts(items) == ["b"]

    backend.run(scenario)


def test_ids_are_128_bit_random_with_the_sdk_prefixes(backend: Backend) -> None:
    store = backend.make()
    meta = thread("thr_x")

    thread_ids = {store.generate_thread_id(ALICE) for _ in range(10_000)}
    assert len(thread_ids) == 10_000
    assert all(re.fullmatch(r"thr_[0-9a-f]{32}", thread_id) for thread_id in thread_ids)
    for item_type in get_args(StoreItemType):
        prefix = default_generate_id(item_type).split("_")[0]
        item_id = store.generate_item_id(item_type, meta, ALICE)
        assert re.fullmatch(rf"{prefix}_[0-9a-f]{{32}}", item_id), item_id
    assert store.generate_item_id("message", meta, ALICE).startswith("msg_")


def test_purge_owner_and_list_owner_threads(backend: Backend) -> None:
    store = backend.make()

    async def scenario() -> None:
        for minutes in (2, 0, 1):
            thread_id = f"thr_a{minutes}"
            await store.save_thread(thread(thread_id, T0 + timedelta(minutes=minutes)), ALICE)
            await store.add_thread_item(thread_id, user_message(thread_id, "msg", "a"), ALICE)
        await store.save_thread(thread("thr_b"), BOB)
        await store.add_thread_item("thr_b", user_message("thr_b", "msg", "b"), BOB)

        listed = await store.list_owner_threads(ALICE.owner)
        assert [t.id for t in listed] == ["thr_a0", "thr_a1", "thr_a2"]

        assert await store.purge_owner(ALICE.owner) == 3
        assert await store.list_owner_threads(ALICE.owner) == []
        assert (await store.load_threads(20, None, "asc", ALICE)).data == []
        with pytest.raises(NotFoundError):
            await store.load_item("thr_a1", "msg", ALICE)
        assert await store.purge_owner(ALICE.owner) == 0

        assert [t.id for t in await store.list_owner_threads(BOB.owner)] == ["thr_b"]
        assert texts((await store.load_thread_items("thr_b", None, 20, "asc", BOB)).data) == ["b"]

    backend.run(scenario)


def attachment(attachment_id: str, thread_id: str | None = None) -> FileAttachment:
    return FileAttachment(id=attachment_id, name="a.pdf", mime_type="application/pdf",
                          thread_id=thread_id)  # fmt: skip


def test_attachments_are_owner_scoped_and_go_with_their_thread(backend: Backend) -> None:
    store = backend.make(thread_ttl=3600)

    async def scenario() -> None:
        await store.save_thread(thread("thr_a"), ALICE)
        await store.save_thread(thread("thr_b"), BOB)
        await store.save_attachment(attachment("atc_unsent"), ALICE)
        await store.save_attachment(attachment("atc_sent", "thr_a"), ALICE)
        assert (await store.load_attachment("atc_sent", ALICE)).thread_id == "thr_a"
        # Another owner can neither read, take over, delete, nor attach to a foreign thread.
        with pytest.raises(NotFoundError):
            await store.load_attachment("atc_unsent", BOB)
        with pytest.raises(NotFoundError):
            await store.save_attachment(attachment("atc_unsent", "thr_b"), BOB)
        with pytest.raises(NotFoundError):
            await store.save_attachment(attachment("atc_other", "thr_a"), BOB)
        await store.delete_attachment("atc_unsent", BOB)
        assert (await store.load_attachment("atc_unsent", ALICE)).thread_id is None
        ids = ["atc_unsent", "atc_sent", "atc_other", "atc_missing"]
        assert await store.known_attachments(ids) == {"atc_unsent", "atc_sent"}
        assert await store.owner_attachments(ALICE.owner) == ["atc_sent", "atc_unsent"]

        # A deleted thread takes its attachments (Redis: at the next prune).
        await store.delete_thread("thr_a", ALICE)
        await store.prune()
        assert await store.known_attachments(ids) == {"atc_unsent"}
        with pytest.raises(NotFoundError):
            await store.load_attachment("atc_sent", ALICE)

        # Moved with the visitor's threads at log-in; purged with the owner.
        await store.move_owner(ALICE.owner, BOB.owner)
        assert (await store.load_attachment("atc_unsent", BOB)).id == "atc_unsent"
        with pytest.raises(NotFoundError):
            await store.load_attachment("atc_unsent", ALICE)
        await store.save_attachment(attachment("atc_b", "thr_b"), BOB)
        assert await store.purge_owner(BOB.owner) == 1
        assert await store.known_attachments([*ids, "atc_b"]) == set()

        # One never sent in a message is pruned a TTL after its creation.
        await store.save_attachment(attachment("atc_late"), ALICE)
        await store.prune()
        assert await store.known_attachments(["atc_late"]) == {"atc_late"}
        later = (time.time() if backend.is_redis else backend.clock.now) + 3601
        await store.prune(now=later)
        assert await store.known_attachments(["atc_late"]) == set()

    backend.run(scenario)


def test_a_page_request_is_capped_and_checked(backend: Backend) -> None:
    store = backend.make()

    async def scenario() -> None:
        await store.save_thread(thread("thr_cap"), ALICE)
        for i in range(101):
            item = user_message("thr_cap", f"msg_{i:03}", "x", T0 + timedelta(seconds=i))
            await store.add_thread_item("thr_cap", item, ALICE)
        page = await store.load_thread_items("thr_cap", None, 10_000, "asc", ALICE)
        assert (len(page.data), page.has_more, page.after) == (100, True, "msg_099")
        with pytest.raises(ValueError, match="order"):
            await store.load_threads(10, None, "random; DROP TABLE x", ALICE)

    backend.run(scenario)


def test_prune_applies_a_shortened_ttl_to_threads_already_stored(backend: Backend) -> None:
    """Retention is the current setting: threads written under a 1-hour TTL are pruned by their
    last activity once the TTL is 1 s (Redis: the survivors' keys re-expired to match)."""
    written = backend.make(thread_ttl=3600)
    shortened = backend.make(thread_ttl=1)

    async def scenario() -> None:
        await written.save_thread(thread("thr_idle"), ALICE)
        await written.add_thread_item("thr_idle", user_message("thr_idle", "msg", "x"), ALICE)
        await written.save_thread(thread("thr_busy", T0 + timedelta(seconds=1)), ALICE)
        await backend.let_time_pass(1.2)
        await written.add_thread_item("thr_busy", user_message("thr_busy", "msg", "y"), ALICE)

        assert await shortened.prune() == 1
        for store in (written, shortened):
            assert [t.id for t in await store.list_owner_threads(ALICE.owner)] == ["thr_busy"]
            with pytest.raises(NotFoundError):
                await store.load_item("thr_idle", "msg", ALICE)
        if backend.is_redis:
            raw = backend.raw_client()
            keys = [k.decode() for k in await raw.keys(f"{PREFIX}:*")]
            assert not [k for k in keys if "thr_idle" in k]
            for key in keys:  # thr_busy's three keys and the index: a 1 s life left at most
                assert 0 < await raw.pttl(key) <= 1000, key
            await raw.aclose()
        await backend.let_time_pass(1.2)
        # Redis expired the re-expired keys by itself; SQLite deletes at the next prune.
        assert await shortened.prune() == (0 if backend.is_redis else 1)
        assert await written.list_owner_threads(ALICE.owner) == []

    backend.run(scenario)


def test_move_owner_gives_a_visitors_threads_to_an_account(backend: Backend) -> None:
    store = backend.make()

    async def scenario() -> None:
        for minutes in (0, 1):
            thread_id = f"thr_a{minutes}"
            await store.save_thread(thread(thread_id, T0 + timedelta(minutes=minutes)), ALICE)
            await store.add_thread_item(thread_id, user_message(thread_id, "msg", "a"), ALICE)
        await store.save_thread(thread("thr_b", T0 + timedelta(minutes=2)), BOB)

        assert await store.move_owner(ALICE.owner, BOB.owner) == 2
        listed = (await store.load_threads(20, None, "asc", BOB)).data
        assert [t.id for t in listed] == ["thr_a0", "thr_a1", "thr_b"]
        assert texts((await store.load_thread_items("thr_a1", None, 20, "asc", BOB)).data) == ["a"]
        await store.add_thread_item("thr_a1", user_message("thr_a1", "msg_2", "b"), BOB)
        assert await store.list_owner_threads(ALICE.owner) == []
        for read in (
            store.load_thread("thr_a0", ALICE),
            store.load_item("thr_a0", "msg", ALICE),
            store.add_thread_item("thr_a0", user_message("thr_a0", "msg_3", "?"), ALICE),
        ):
            with pytest.raises(NotFoundError):
                await read
        assert await store.move_owner(ALICE.owner, BOB.owner) == 0

    backend.run(scenario)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis), POSTGRES, MYSQL])
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A store other threads can open too (fakeredis lives in one client's server)."""
    yield from _backend(request, request.param, tmp_path)


def test_a_concurrent_reader_sees_all_threads_moved_or_none(shared_backend: Backend) -> None:
    backend, count = shared_backend, 300
    store = backend.make()

    async def fill() -> None:
        for i in range(count):
            await store.save_thread(thread(f"thr_{i:04}", T0 + timedelta(seconds=i)), ALICE)

    backend.run(fill)
    seen: list[int] = []
    stop = threading.Event()

    def read() -> None:
        reader = backend.make()

        async def loop() -> None:
            while not stop.is_set():
                seen.append(len(await reader.list_owner_threads(BOB.owner)))
            if isinstance(reader, RedisStore | SQLStore):
                await reader.aclose()

        asyncio.run(loop())

    watcher = threading.Thread(target=read)
    watcher.start()
    while not seen:
        time.sleep(0.01)
    moved = backend.run(lambda: store.move_owner(ALICE.owner, BOB.owner))
    time.sleep(0.1)
    stop.set()
    watcher.join()
    assert moved == count
    assert set(seen) <= {0, count}, sorted(set(seen))
    assert seen[0] == 0 and seen[-1] == count


# -- Redis specifics ------------------------------------------------------------------------------


def test_every_redis_key_of_a_thread_expires(redis_backend: Backend) -> None:
    store = redis_backend.make(thread_ttl=600)

    async def scenario() -> None:
        raw = redis_backend.raw_client()
        for owner in (ALICE, BOB):
            thread_id = f"thr_{owner.owner[-3:]}"
            await store.save_thread(thread(thread_id), owner)
            await store.add_thread_item(thread_id, user_message(thread_id, "msg", "x"), owner)
        keys = sorted(k.decode() for k in await raw.keys(f"{PREFIX}:*"))
        assert len(keys) == 8  # 2 threads x (thread, order, items) + 2 owner indexes
        for key in keys:
            assert 0 < await raw.pttl(key) <= 600_000, key

        await store.purge_owner(ALICE.owner)
        left = sorted(k.decode() for k in await raw.keys(f"{PREFIX}:*"))
        assert left == [k for k in keys if "ice" not in k]
        await raw.aclose()

    redis_backend.run(scenario)


def test_redis_client_follows_the_running_loop(redis_backend: Backend) -> None:
    store = redis_backend.make()
    asyncio.run(store.save_thread(thread("thr_loop"), ALICE))  # first loop, then closed
    loaded = redis_backend.run(lambda: store.load_thread("thr_loop", ALICE))  # a new loop
    assert loaded.id == "thr_loop"


# -- SQLite specifics -----------------------------------------------------------------------------


class _BusyAtFirst:
    """A sqlite3 connection whose first ``busy`` statements are refused at once with
    ``error`` (as SQLite refuses two processes switching a new file to WAL together)."""

    def __init__(self, db: sqlite3.Connection, busy: int, error: str) -> None:
        self.db, self.busy, self.error, self.refused = db, busy, error, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def execute(self, sql: str, *args: Any) -> Any:
        if self.refused < self.busy:
            self.refused += 1
            refusal = sqlite3.OperationalError("database is locked")
            refusal.sqlite_errorname = self.error  # type: ignore[attr-defined]
            raise refusal
        return self.db.execute(sql, *args)


def test_sqlite_set_up_tries_again_when_another_process_holds_the_new_file(
    tmp_path: Path,
) -> None:
    """gunicorn's workers open a new threads file at once: a set-up step SQLite refuses at
    once (SQLITE_BUSY, no busy_timeout wait) is tried again, so no worker fails to boot; any
    other error is not retried."""
    from chatkit_flask.server.store_sqlite import _prepare

    db = sqlite3.connect(tmp_path / "threads.db", isolation_level=None)
    busy = _BusyAtFirst(db, 3, "SQLITE_BUSY")
    _prepare(busy)  # type: ignore[arg-type]
    assert busy.refused == 3
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT count(*) FROM chatkit_threads").fetchone()[0] == 0
    broken = _BusyAtFirst(db, 1, "SQLITE_IOERR")
    with pytest.raises(sqlite3.OperationalError):
        _prepare(broken)  # type: ignore[arg-type]
    assert broken.refused == 1
    db.close()


def test_sqlite_prune_deletes_expired_threads_and_items(tmp_path: Path) -> None:
    backend = Backend("sqlite", tmp_path)
    store = backend.make(thread_ttl=60)
    assert isinstance(store, SQLiteStore)

    async def scenario() -> None:
        await store.save_thread(thread("thr_old"), ALICE)
        await store.add_thread_item("thr_old", user_message("thr_old", "msg", "x"), ALICE)
        backend.clock.now += 30
        await store.save_thread(thread("thr_new"), ALICE)
        await store.add_thread_item("thr_new", user_message("thr_new", "msg", "y"), ALICE)

    backend.run(scenario)
    assert asyncio.run(store.prune()) == 0
    assert asyncio.run(store.prune(now=backend.clock.now + 31)) == 1
    with sqlite3.connect(store.path) as db:
        rows = db.execute("SELECT thread_id, id FROM chatkit_items").fetchall()
        assert [r[0] for r in db.execute("SELECT id FROM chatkit_threads")] == ["thr_new"]
    assert rows == [("thr_new", "msg")]
    backend.clock.now += 1000
    assert asyncio.run(store.prune()) == 1


def _write_from_child(store: OwnerScopedStore, name: str, start: Any) -> None:
    async def write() -> None:
        owner = RequestContext(owner=f"visitor:{name}")
        await store.save_thread(thread(f"thr_{name}"), owner)
        start.wait()  # both processes write the shared thread at the same time

        async def writer(first: int) -> None:  # and several writers in each process
            for i in range(first, 15, 3):
                item = user_message("thr_shared", f"msg_{name}_{i}", f"{name} {i}")
                await store.add_thread_item("thr_shared", item, ALICE)

        await asyncio.gather(*(writer(first) for first in range(3)))
        if isinstance(store, SQLStore):
            await store.aclose()

    asyncio.run(write())


@pytest.mark.parametrize("kind", ["sqlite", POSTGRES, MYSQL])
def test_two_processes_share_one_store(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """Forked workers (as gunicorn makes them) write one thread at once: nothing lost, no
    connection shared across the fork."""
    store: OwnerScopedStore
    if kind in ("postgres", "mysql"):
        store = SQLStore(request.getfixturevalue(f"{kind}_tables"), 3600)
    else:
        store = SQLiteStore(tmp_path / "shared.db", 3600)
    asyncio.run(store.save_thread(thread("thr_shared"), ALICE))  # the parent uses it first

    fork = multiprocessing.get_context("fork")  # gunicorn forks its workers the same way
    start = fork.Barrier(2)
    children = [
        fork.Process(target=_write_from_child, args=(store, name, start)) for name in ("p1", "p2")
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0]

    async def read() -> None:
        page = await store.load_thread_items("thr_shared", None, 100, "asc", ALICE)
        assert sorted(item.id for item in page.data) == sorted(
            f"msg_{name}_{i}" for name in ("p1", "p2") for i in range(15)
        )
        for name in ("p1", "p2"):
            owner = RequestContext(owner=f"visitor:{name}")
            assert [t.id for t in await store.list_owner_threads(owner.owner)] == [f"thr_{name}"]
        if isinstance(store, SQLStore):
            await store.aclose()

    asyncio.run(read())


# -- through the SDK ------------------------------------------------------------------------------


class EchoServer(ChatKitServer[RequestContext]):
    """The SDK's own server over our store; replies by echoing (no model)."""

    async def respond(
        self,
        thread: ThreadMetadata,
        input_user_message: UserMessageItem | None,
        context: RequestContext,
    ) -> AsyncIterator[ThreadStreamEvent]:
        assert input_user_message is not None
        yield ThreadItemDoneEvent(
            item=AssistantMessageItem(
                id=self.store.generate_item_id("message", thread, context),
                thread_id=thread.id,
                created_at=datetime.now(),
                content=[AssistantMessageContent(text=f"echo: {texts([input_user_message])[0]}")],
            )
        )


async def call(server: EchoServer, context: RequestContext, **request: Any) -> Any:
    result = await server.process(json.dumps(request).encode(), context)
    if isinstance(result, StreamingResult):
        return [json.loads(frame.removeprefix(b"data: ")) async for frame in result]
    return json.loads(result.json)


def test_the_sdk_server_runs_on_the_store(backend: Backend) -> None:
    server = EchoServer(backend.make())
    message = {
        "content": [{"type": "input_text", "text": "hello"}],
        "attachments": [],
        "inference_options": {},
    }

    async def scenario() -> None:
        events = await call(server, ALICE, type="threads.create", params={"input": message})
        thread_id = events[0]["thread"]["id"]
        assert re.fullmatch(r"thr_[0-9a-f]{32}", thread_id)
        follow_up = {**message, "content": [{"type": "input_text", "text": "again"}]}
        await call(
            server,
            ALICE,
            type="threads.add_user_message",
            params={"thread_id": thread_id, "input": follow_up},
        )

        items = await call(server, ALICE, type="items.list", params={"thread_id": thread_id})
        said = [part["text"] for item in items["data"] for part in item["content"]]
        assert said == ["echo: again", "again", "echo: hello", "hello"]  # newest first
        threads = await call(server, ALICE, type="threads.list", params={})
        assert [t["id"] for t in threads["data"]] == [thread_id]

        # Bob sees none of it and cannot write to it.
        assert (await call(server, BOB, type="threads.list", params={}))["data"] == []
        for request in (
            {"type": "threads.get_by_id", "params": {"thread_id": thread_id}},
            {"type": "items.list", "params": {"thread_id": thread_id}},
        ):
            with pytest.raises(NotFoundError):
                await call(server, BOB, **request)
        with pytest.raises(NotFoundError):
            await call(
                server,
                BOB,
                type="threads.add_user_message",
                params={"thread_id": thread_id, "input": message},
            )
        await call(server, ALICE, type="threads.delete", params={"thread_id": thread_id})
        assert (await call(server, ALICE, type="threads.list", params={}))["data"] == []

    backend.run(scenario)


# -- open_store -----------------------------------------------------------------------------------


def test_open_store_picks_the_store_from_the_url(tmp_path: Path) -> None:
    relative = open_store("sqlite:///chatkit.db", thread_ttl=60)
    assert isinstance(relative, SQLiteStore)
    assert relative.path == Path.cwd() / "chatkit.db"
    absolute = open_store(f"sqlite:///{tmp_path}/chat%20kit.db", thread_ttl=60)
    assert isinstance(absolute, SQLiteStore)
    assert absolute.path == tmp_path / "chat kit.db"
    assert absolute.thread_ttl == 60

    for url in (
        "redis://:s3cret@cache.example:6379/13",
        "rediss://cache.example:6380/0",
        "unix:///run/redis.sock?db=2",
        "REDIS://127.0.0.1",
    ):
        store = open_store(url, thread_ttl=60)
        assert isinstance(store, RedisStore), url
        assert "s3cret" not in repr(store)


@pytest.mark.parametrize(
    ("url", "database"),
    [
        ("postgresql+psycopg://u:p@db/chat", "postgresql"),
        ("POSTGRESQL://db/chat", "postgresql"),
        ("mysql+aiomysql://u:p@db/chat", "mysql"),
        ("mariadb+aiomysql://u:p@db/chat", "mariadb"),
        ("sqlite+aiosqlite:///chat.db", "sqlite"),
        ("sqlite:///chat.db", None),  # the embedded store, not SQLAlchemy's
        ("redis://cache:6379/0", None),
        ("memcached://cache", None),
    ],
)
def test_sql_database_names_the_database_a_sql_url_runs_on(url: str, database: str | None) -> None:
    """What gunicorn's master warms (the driver) and which store opens both follow this."""
    assert sql_database(url) == database


@pytest.mark.parametrize(
    "url",
    [
        "memcached://user:s3cret@cache:11211",
        "redis://user:s3cret@cache:notaport/0",
        "redis://user:s3cret@cache:6379/notadb",
        "redis://user:s3cret@[::1/0",
        "rediss://user:s3cret@cache:6379/0/extra",
        "sqlite://user:s3cret@host/chatkit.db",
        "sqlite:///:memory:",
        "sqlite:///no/such/directory/chatkit.db",
        "sqlite:///chatkit.db?password=s3cret",
        "user:s3cret@cache:6379",
        "",
    ],
)
def test_open_store_refuses_a_bad_url_without_repeating_a_password(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        open_store(url, thread_ttl=60)
    assert raised.value.key == "CHATKIT_STORE_URL"
    assert "s3cret" not in str(raised.value)


def test_open_store_refuses_a_ttl_that_is_not_positive() -> None:
    for ttl in (0, -5, True):
        with pytest.raises(ValueError, match="thread_ttl"):
            open_store("sqlite:///chatkit.db", thread_ttl=ttl)
