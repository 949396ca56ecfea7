"""The database store: threads in the site's own SQL database, through SQLAlchemy 2 Core.

``postgresql+psycopg://`` (psycopg 3) and ``mysql+pymysql://`` (aiomysql; tested on MariaDB 10.11)
are the tested ones; ``sqlite+aiosqlite://`` works too (plain ``sqlite:///`` keeps the embedded
:class:`.SQLiteStore`, which is faster). The SDK's store API is async and runs on the
worker's event loop, so queries go through an async engine, made on the loop that first uses the
store and again when the loop or the process (a gunicorn fork) changes.

Tables come from the migrations only (:mod:`.sql_schema`); :meth:`SQLStore.probe` refuses a
schema that is behind and names the command that fixes it. Each operation is one short
transaction whose ownership check is part of its first statement (``... WHERE id = :id AND
owner = :owner``), so a visitor never reads or writes another's rows, even between two workers.
Expiry follows the clock of the process (hosts must keep time with NTP): a thread not written
for ``thread_ttl`` seconds is hidden at once and deleted by :meth:`SQLStore.prune`, an indexed
``DELETE`` on ``updated_at`` (items go with their thread, ``ON DELETE CASCADE``). Attachment rows
name their thread once sent in a message and cascade with it (deleted, pruned, purged; moved with
it at log-in); one never sent is pruned ``thread_ttl`` after it was created (revision 0002).

Deadlines: PostgreSQL ends a statement after ``timeout`` seconds (``statement_timeout``; MySQL a
row-lock wait, MariaDB any statement), a connection attempt gives up after as long, and the
event loop waits at most twice that for a whole operation (a server that stopped answering).
``pool_pre_ping`` replaces a connection the database closed (a restart), so only the operations
in flight at that moment fail.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from chatkit.types import Attachment, Page, ThreadItem, ThreadMetadata
from pydantic import TypeAdapter
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from chatkit_flask.server.context import RequestContext
from chatkit_flask.server.sql_schema import (
    DEFAULT_TABLE_PREFIX,
    Tables,
    current_revision,
    head_revision,
    sync_url,
    upgrade,
    upgrade_sql,
)
from chatkit_flask.server.store import (
    ITEM_ADAPTER,
    OwnerScopedStore,
    StoreUnusable,
    add_store_error_type,
    check_page_args,
    make_page,
    mask_url,
    not_found,
    sort_key,
    thread_json,
)

__all__ = [
    "DEFAULT_POOL_SIZE",
    "DEFAULT_TIMEOUT",
    "SQLStore",
    "SchemaBehind",
    "async_url",
    "host_engine_url",
]

add_store_error_type(SQLAlchemyError)  # a "store unavailable" answer, as for Redis and SQLite

DEFAULT_POOL_SIZE = 5  # connections per worker process (gthread threads share one event loop)
DEFAULT_TIMEOUT = 10.0  # seconds per statement, and to connect
UPGRADE_COMMAND = "flask chatkit db upgrade"
ATTACHMENT_ADAPTER: TypeAdapter[Attachment] = TypeAdapter(Attachment)
# The async driver for each database; a host's sync engine (Flask-SQLAlchemy) maps onto these.
ASYNC_DRIVERS = {"postgresql": "psycopg", "sqlite": "aiosqlite", "mysql": "aiomysql",
                 "mariadb": "aiomysql"}  # fmt: skip
_R = TypeVar("_R")


class SchemaBehind(StoreUnusable):
    """The database's store tables are older than this version of the package (or missing)."""

    def __init__(self, current: str | None, head: str, prefix: str) -> None:
        where = f"at revision {current}" if current else f"missing (no {prefix}* tables)"
        super().__init__(
            f"its tables are {where}, this version needs {head}: run `{UPGRADE_COMMAND}`",
            "schema_behind",
        )


def async_url(url: sa.URL | str) -> sa.URL:
    """``url`` with the async driver of its database (``postgresql://`` and
    ``postgresql+psycopg2://`` -> ``postgresql+psycopg://``, ``sqlite://`` ->
    ``sqlite+aiosqlite://``, ``mysql+pymysql://`` -> ``mysql+aiomysql://``)."""
    url = sa.make_url(url)
    backend = url.get_backend_name()
    if backend not in ASYNC_DRIVERS:
        raise ValueError(f"{backend} databases are not supported (PostgreSQL, MySQL, SQLite)")
    return url.set(drivername=f"{backend}+{ASYNC_DRIVERS[backend]}")


def host_engine_url(source: Any, app: Any = None, bind: str | None = None) -> sa.URL:
    """The database URL (password included) of what a host app hands over: a SQLAlchemy
    ``Engine`` or ``AsyncEngine``, a URL, or a Flask-SQLAlchemy object (its engine ``bind``,
    default engine when None, read inside an app context of ``app``). The store makes its own
    async engine on that URL: a sync engine's connections cannot serve the event loop."""
    if isinstance(getattr(type(source), "engines", None), property):  # Flask-SQLAlchemy
        with app.app_context():
            engines = source.engines
            if bind not in engines:
                known = ", ".join(sorted(repr(key) for key in engines if key)) or "none"
                raise LookupError(
                    f"the app's Flask-SQLAlchemy has no bind {bind!r} (binds: {known})"
                )
            source = engines[bind]
    if isinstance(source, sa.engine.Engine | AsyncEngine):
        return source.url
    if isinstance(source, str | sa.URL):
        return sa.make_url(source)
    raise TypeError(
        f"store_engine must be an Engine, an AsyncEngine, a URL or Flask-SQLAlchemy's db, "
        f"not {type(source).__name__}"
    )


@dataclass
class _Held:
    engine: AsyncEngine
    loop: asyncio.AbstractEventLoop
    pid: int


class SQLStore(OwnerScopedStore):
    """Threads, items and attachments in the database at ``url`` (a SQLAlchemy URL; a sync
    driver is swapped for its async one, see :func:`async_url`), tables under ``table_prefix``.

    ``pool_size``: connections per process (``max_overflow`` as many again); ``timeout``: the
    per-statement deadline in seconds. ``clock`` (seconds, like ``time.time``) decides expiry.
    """

    kind = "sql"

    def __init__(
        self,
        url: sa.URL | str,
        thread_ttl: int,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        pool_size: int = DEFAULT_POOL_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(thread_ttl)
        self.url = async_url(url)
        self.tables = Tables.under(table_prefix)
        self.pool_size = pool_size
        self.timeout = timeout
        self._clock = clock
        self._held: _Held | None = None
        self._head: str | None = None
        self.kind = self.url.get_backend_name()  # "postgresql": how logs name it

    def __repr__(self) -> str:
        return f"SQLStore({self.display_url!r})"

    @property
    def display_url(self) -> str:
        """The URL fit for a message or a log (no password, no query)."""
        return mask_url(self.url.render_as_string(hide_password=True))

    # -- ChatKit Store --------------------------------------------------------------------------

    async def load_thread(self, thread_id: str, context: RequestContext) -> ThreadMetadata:
        t = self.tables.threads
        query = sa.select(t.c.data).where(*self._live_thread(thread_id, context.owner))
        data = await self._transaction(lambda db: db.scalar(query))
        if data is None:
            not_found("thread", thread_id)
        return ThreadMetadata.model_validate_json(data)

    async def save_thread(self, thread: ThreadMetadata, context: RequestContext) -> None:
        t, owner = self.tables.threads, context.owner

        async def write(db: AsyncConnection) -> None:
            now = self._clock()
            row = (
                await db.execute(
                    sa.select(t.c.owner, t.c.updated_at).where(t.c.id == thread.id)
                    .with_for_update()
                )
            ).first()  # fmt: skip
            if row is not None and row.updated_at <= now - self.thread_ttl:
                # Expired but not pruned yet: it is gone, so its items must not come back.
                await db.execute(sa.delete(t).where(t.c.id == thread.id))
            elif row is not None and row.owner != owner:
                not_found("thread", thread.id)
            await self._upsert(
                db, t, {"id": thread.id, "owner": owner, "created_us": sort_key(thread.created_at),
                        "updated_at": now, "data": thread_json(thread)},
                keys=("id",), owned=True,
            )  # fmt: skip

        await self._transaction(write)

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: RequestContext
    ) -> Page[ThreadMetadata]:
        limit = check_page_args(limit, order)
        t, owner = self.tables.threads, context.owner

        async def read(db: AsyncConnection) -> list[str]:
            scope = [t.c.owner == owner, t.c.updated_at > self._active_since()]
            cursor = [t.c.id == after, t.c.owner == owner]
            return await self._page(db, t, scope, cursor, "thread", after, limit, order)

        rows = await self._transaction(read)
        return make_page([ThreadMetadata.model_validate_json(data) for data in rows], limit)

    async def delete_thread(self, thread_id: str, context: RequestContext) -> None:
        t = self.tables.threads

        async def write(db: AsyncConnection) -> None:
            live = self._live_thread(thread_id, context.owner)
            done = await db.execute(sa.delete(t).where(*live))
            if done.rowcount == 0:
                not_found("thread", thread_id)

        await self._transaction(write)

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: RequestContext
    ) -> Page[ThreadItem]:
        limit = check_page_args(limit, order)
        i = self.tables.items

        async def read(db: AsyncConnection) -> list[str]:
            await self._require_thread(db, thread_id, context.owner)
            scope = [i.c.thread_id == thread_id]
            cursor = [i.c.thread_id == thread_id, i.c.id == after]
            return await self._page(db, i, scope, cursor, "item", after, limit, order)

        rows = await self._transaction(read)
        return make_page([ITEM_ADAPTER.validate_json(data) for data in rows], limit)

    async def add_thread_item(
        self, thread_id: str, item: ThreadItem, context: RequestContext
    ) -> None:
        await self._put_item(thread_id, item, context.owner)

    async def save_item(self, thread_id: str, item: ThreadItem, context: RequestContext) -> None:
        await self._put_item(thread_id, item, context.owner)

    async def load_item(self, thread_id: str, item_id: str, context: RequestContext) -> ThreadItem:
        i = self.tables.items

        async def read(db: AsyncConnection) -> str | None:
            await self._require_thread(db, thread_id, context.owner)
            return await db.scalar(
                sa.select(i.c.data).where(i.c.thread_id == thread_id, i.c.id == item_id)
            )

        data = await self._transaction(read)
        if data is None:
            not_found("item", item_id)
        return ITEM_ADAPTER.validate_json(data)

    async def delete_thread_item(
        self, thread_id: str, item_id: str, context: RequestContext
    ) -> None:
        i = self.tables.items

        async def write(db: AsyncConnection) -> None:
            await self._touch(db, thread_id, context.owner)
            await db.execute(sa.delete(i).where(i.c.thread_id == thread_id, i.c.id == item_id))

        await self._transaction(write)

    async def save_attachment(self, attachment: Attachment, context: RequestContext) -> None:
        """Insert or update ``owner``'s attachment; another owner's id, or a thread that is not
        the owner's live one, is ``NotFoundError``. ``created_at`` is set once: an attachment
        never sent expires ``thread_ttl`` after its upload began."""
        a, owner, thread_id = self.tables.attachments, context.owner, attachment.thread_id

        async def write(db: AsyncConnection) -> None:
            holder = await db.scalar(
                sa.select(a.c.owner).where(a.c.id == attachment.id).with_for_update()
            )
            if holder is not None and holder != owner:
                not_found("attachment", attachment.id)
            if thread_id is not None:  # locked: a concurrent delete waits for this write
                await self._require_thread(db, thread_id, owner, lock=True)
            await self._upsert(
                db, a, {"id": attachment.id, "owner": owner, "thread_id": thread_id,
                        "created_at": self._clock(), "data": attachment.model_dump_json()},
                keys=("id",), owned=True, keep=("owner", "created_at"),
            )  # fmt: skip

        await self._transaction(write)

    async def load_attachment(self, attachment_id: str, context: RequestContext) -> Attachment:
        a = self.tables.attachments
        query = sa.select(a.c.data).where(a.c.id == attachment_id, a.c.owner == context.owner)
        data = await self._transaction(lambda db: db.scalar(query))
        if data is None:
            not_found("attachment", attachment_id)
        return ATTACHMENT_ADAPTER.validate_json(data)

    async def delete_attachment(self, attachment_id: str, context: RequestContext) -> None:
        a = self.tables.attachments
        statement = sa.delete(a).where(a.c.id == attachment_id, a.c.owner == context.owner)
        await self._transaction(lambda db: db.execute(statement))

    # -- owner-wide operations ------------------------------------------------------------------

    async def known_attachments(self, attachment_ids: list[str]) -> set[str]:
        a = self.tables.attachments

        async def read(db: AsyncConnection) -> set[str]:
            known: set[str] = set()
            for start in range(0, len(attachment_ids), 500):  # bounded statements
                batch = attachment_ids[start : start + 500]
                known.update(await db.scalars(sa.select(a.c.id).where(a.c.id.in_(batch))))
            return known

        return await self._transaction(read)

    async def owner_attachments(self, owner: str) -> list[str]:
        a = self.tables.attachments
        query = sa.select(a.c.id).where(a.c.owner == owner).order_by(a.c.id)
        return list(await self._transaction(lambda db: db.scalars(query)))

    async def list_owner_threads(self, owner: str) -> list[ThreadMetadata]:
        t = self.tables.threads
        query = (
            sa.select(t.c.data)
            .where(t.c.owner == owner, t.c.updated_at > self._active_since())
            .order_by(t.c.created_us, t.c.id)
        )
        rows = await self._transaction(lambda db: db.scalars(query))
        return [ThreadMetadata.model_validate_json(data) for data in rows]

    async def purge_owner(self, owner: str) -> int:
        t, a = self.tables.threads, self.tables.attachments

        async def write(db: AsyncConnection) -> int:
            live = await db.scalar(
                sa.select(sa.func.count()).select_from(t)
                .where(t.c.owner == owner, t.c.updated_at > self._active_since())
            )  # fmt: skip
            await db.execute(sa.delete(t).where(t.c.owner == owner))  # items cascade
            await db.execute(sa.delete(a).where(a.c.owner == owner))
            return int(live or 0)

        return await self._transaction(write)

    async def move_owner(self, source: str, target: str) -> int:
        """One ``UPDATE`` of the threads (a concurrent reader sees every thread moved or none),
        in the same transaction the attachments that go with them: those of the moved threads
        and those not sent yet (an expired thread's stay with it, to be pruned)."""
        t, a = self.tables.threads, self.tables.attachments

        async def write(db: AsyncConnection) -> int:
            moved = await db.execute(
                sa.update(t).where(t.c.owner == source, t.c.updated_at > self._active_since())
                .values(owner=target)
            )  # fmt: skip
            targets = sa.select(t.c.id).where(t.c.owner == target)
            await db.execute(
                sa.update(a).where(a.c.owner == source,
                                   sa.or_(a.c.thread_id.is_(None), a.c.thread_id.in_(targets)))
                .values(owner=target)
            )  # fmt: skip
            return moved.rowcount

        return await self._transaction(write)

    async def prune(self, now: float | None = None) -> int:
        t, a = self.tables.threads, self.tables.attachments
        cutoff = (self._clock() if now is None else now) - self.thread_ttl

        async def write(db: AsyncConnection) -> int:
            # Never sent in a message (an index scan on thread_id, created_at); the others
            # cascade with their thread.
            await db.execute(sa.delete(a).where(a.c.thread_id.is_(None), a.c.created_at <= cutoff))
            pruned = await db.execute(sa.delete(t).where(t.c.updated_at <= cutoff))
            return pruned.rowcount

        return await self._transaction(write)

    async def probe(self, *, write: bool) -> None:
        """Connect, check that the tables are at this package's revision (else
        :class:`SchemaBehind`), then read (``write=False``) or write one row and roll it back.
        The start-up probe (``write=True``) closes its connections: none may cross a fork."""
        head = self._head = self._head or head_revision()
        try:
            async with self._connect() as db:
                current = await db.run_sync(current_revision, self.tables.prefix)
                await db.rollback()
                if current != head:
                    raise SchemaBehind(current, head, self.tables.prefix)
                t = self.tables.threads
                if not write:
                    await db.execute(sa.select(t.c.id).limit(1))
                    return
                async with db.begin() as transaction:
                    await db.execute(
                        sa.insert(t).values(id=f"probe_{secrets.token_hex(8)}", owner="",
                                            created_us=0, updated_at=0, data="{}")
                    )  # fmt: skip
                    await transaction.rollback()
        except SQLAlchemyError as exc:
            raise _unusable(exc) from None
        except TimeoutError:
            raise StoreUnusable(f"no answer within {2 * self.timeout:g} s", "timeout") from None
        finally:
            if write:
                await self.aclose()

    # -- migrations (blocking: for the CLI, never on the event loop) ----------------------------

    def schema_revisions(self) -> tuple[str | None, str]:
        """(the revision the database is at, or None; the one this version needs)."""
        engine = sa.create_engine(sync_url(self.url), poolclass=sa.NullPool)
        try:
            with engine.connect() as connection:
                return current_revision(connection, self.tables.prefix), head_revision()
        finally:
            engine.dispose()

    def upgrade_schema(self) -> str:
        """Run the shipped migrations up to this version's revision; returns it."""
        return upgrade(self.url, self.tables.prefix)

    def upgrade_script(self, start: str | None) -> str:
        """The SQL of the migrations from ``start`` (None: nothing) to this version, in this
        database's dialect, run nowhere."""
        return upgrade_sql(self.url, self.tables.prefix, start)

    async def aclose(self) -> None:
        """Close this process's connections if they belong to the running loop (at shutdown,
        after the start-up probe, and in tests)."""
        held, self._held = self._held, None
        if held is not None and held.pid == os.getpid():
            if held.loop is asyncio.get_running_loop():
                await held.engine.dispose()
            else:  # another loop's connections cannot be closed from here: let them go
                await held.engine.dispose(close=False)

    # -- queries --------------------------------------------------------------------------------

    def _active_since(self) -> float:
        """A thread last written at or before this moment is gone (the current TTL applies to
        every stored thread)."""
        return self._clock() - self.thread_ttl

    def _live_thread(self, thread_id: str, owner: str) -> list[sa.ColumnElement[bool]]:
        t = self.tables.threads
        return [t.c.id == thread_id, t.c.owner == owner, t.c.updated_at > self._active_since()]

    async def _require_thread(
        self, db: AsyncConnection, thread_id: str, owner: str, *, lock: bool = False
    ) -> None:
        t = self.tables.threads
        query = sa.select(t.c.id).where(*self._live_thread(thread_id, owner))
        if await db.scalar(query.with_for_update() if lock else query) is None:
            not_found("thread", thread_id)

    async def _touch(self, db: AsyncConnection, thread_id: str, owner: str) -> None:
        """Mark the thread written now, checking it is live and ``owner``'s in the same
        statement (its row stays locked until the transaction ends: writers of one thread take
        turns, and a concurrent delete waits)."""
        t = self.tables.threads
        touched = await db.execute(
            sa.update(t).where(*self._live_thread(thread_id, owner))
            .values(updated_at=self._clock())
        )  # fmt: skip
        if touched.rowcount == 0:
            not_found("thread", thread_id)

    async def _put_item(self, thread_id: str, item: ThreadItem, owner: str) -> None:
        async def write(db: AsyncConnection) -> None:
            await self._touch(db, thread_id, owner)
            await self._upsert(
                db, self.tables.items,
                {"thread_id": thread_id, "id": item.id, "created_us": sort_key(item.created_at),
                 "data": item.model_dump_json()},
                keys=("thread_id", "id"),
            )  # fmt: skip

        await self._transaction(write)

    async def _upsert(
        self,
        db: AsyncConnection,
        table: sa.Table,
        values: dict[str, Any],
        *,
        keys: tuple[str, ...],
        owned: bool = False,
        keep: tuple[str, ...] = (),
    ) -> None:
        """Insert or update one row in one statement (each database has its own words). With
        ``owned``, a row of another owner is left as it is (a race the caller's check lost);
        the columns in ``keep`` are written by the insert only."""
        changed = {name: value for name, value in values.items() if name not in keys + keep}
        dialect = db.dialect.name
        if dialect in ("postgresql", "sqlite"):
            insert: Any = (
                postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
            ).values(values)
            where = (table.c.owner == insert.excluded.owner) if owned else None
            statement = insert.on_conflict_do_update(
                index_elements=list(keys),
                set_={name: insert.excluded[name] for name in changed},
                where=where,
            )
        else:  # MySQL, MariaDB: no WHERE on the update, so each column keeps its value when the
            # row is another owner's (the owner itself never changes: the order is irrelevant)
            insert = mysql.insert(table).values(values)
            new = {name: insert.inserted[name] for name in changed}
            if owned:
                same_owner = table.c.owner == insert.inserted.owner
                new = {name: sa.case((same_owner, value), else_=table.c[name])
                       for name, value in new.items()}  # fmt: skip
            statement = insert.on_duplicate_key_update(new)
        await db.execute(statement)

    async def _page(
        self,
        db: AsyncConnection,
        table: sa.Table,
        scope: list[sa.ColumnElement[bool]],
        cursor_scope: list[sa.ColumnElement[bool]],
        kind: str,
        after: str | None,
        limit: int,
        order: str,
    ) -> list[str]:
        """The ``data`` of up to ``limit + 1`` rows within ``scope`` in creation ``order``,
        after the ``after`` row (found within ``cursor_scope``; missing or foreign: NotFound)."""
        position = sa.tuple_(table.c.created_us, table.c.id)
        where = list(scope)
        if after is not None:
            cursor = (
                await db.execute(sa.select(table.c.created_us, table.c.id).where(*cursor_scope))
            ).first()
            if cursor is None:
                not_found(kind, after)
            mark = sa.tuple_(sa.literal(cursor[0], sa.BigInteger), sa.literal(cursor[1]))
            where.append(position > mark if order == "asc" else position < mark)
        columns = (table.c.created_us, table.c.id)
        ordering = columns if order == "asc" else tuple(column.desc() for column in columns)
        query = sa.select(table.c.data).where(*where).order_by(*ordering).limit(limit + 1)
        return list(await db.scalars(query))

    # -- connections ----------------------------------------------------------------------------

    async def _transaction(self, work: Callable[[AsyncConnection], Awaitable[_R]]) -> _R:
        """``work`` in one transaction, committed when it returns. A whole operation waits at
        most twice the statement deadline (a database that stopped answering)."""
        try:
            async with asyncio.timeout(2 * self.timeout), self._connect() as db, db.begin():
                return await work(db)
        except TimeoutError:
            raise sa.exc.TimeoutError(
                f"the database did not answer within {2 * self.timeout:g} s"
            ) from None

    @asynccontextmanager
    async def _connect(self) -> Any:
        async with self._engine().connect() as db:
            yield db

    def _engine(self) -> AsyncEngine:
        """The engine for the running loop in this process (connections belong to the loop
        that opened them; a forked child must never use its parent's)."""
        loop = asyncio.get_running_loop()
        held = self._held
        if held is None or held.loop is not loop or held.pid != os.getpid():
            if held is not None and held.pid != os.getpid():
                held.engine.sync_engine.dispose(close=False)  # the parent's: never closed here
            self._held = held = _Held(self._make_engine(), loop, os.getpid())
        return held.engine

    def _make_engine(self) -> AsyncEngine:
        backend = self.url.get_backend_name()
        seconds = max(1, math.ceil(self.timeout))
        connect_args: dict[str, Any] = {}
        options: dict[str, Any] = {}
        if backend == "postgresql":
            connect_args = {
                "connect_timeout": seconds,
                "options": f"-c statement_timeout={int(self.timeout * 1000)}",
                "application_name": "chatkit-flask",
            }
        elif backend == "sqlite":
            connect_args = {"timeout": self.timeout}
        elif backend in ("mysql", "mariadb"):
            # A row lock waited for gives up after the deadline; MariaDB also ends any statement
            # (max_statement_time, in a comment only MariaDB executes). utf8mb4 whatever the
            # server's default.
            connect_args = {
                "connect_timeout": seconds,
                "charset": "utf8mb4",
                "init_command": f"SET SESSION innodb_lock_wait_timeout = {seconds}"
                f" /*M!100108 , max_statement_time = {self.timeout:g} */",
            }
            options["isolation_level"] = "READ COMMITTED"  # as PostgreSQL's default
        engine = create_async_engine(
            self.url,
            pool_size=self.pool_size,
            max_overflow=self.pool_size,
            pool_timeout=self.timeout,
            pool_pre_ping=True,  # a connection the database closed (restart) is replaced
            pool_recycle=1800,  # before a proxy or firewall drops an idle one
            connect_args=connect_args,
            **options,
        )
        if backend == "sqlite":
            sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    """As the embedded store sets them: items cascade with threads (per connection), WAL with
    synchronous=NORMAL (durable across a process crash, no fsync per commit)."""
    cursor = connection.cursor()
    for pragma in ("foreign_keys = ON", "journal_mode = WAL", "synchronous = NORMAL"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _unusable(exc: SQLAlchemyError) -> StoreUnusable:
    """Why the database cannot serve, in words an operator can act on: the driver's first line
    ("connection refused", "password authentication failed for user ..."), never the URL."""
    if isinstance(exc, StoreUnusable):
        return exc
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        first = (str(exc.orig).strip().splitlines() or [""])[0][:300]
        reason = "unreachable" if isinstance(exc, sa.exc.OperationalError) else "unavailable"
        if any(words in first for words in ("does not exist", "doesn't exist", "no such table")):
            reason = "schema_behind"
        return StoreUnusable(f"{type(exc.orig).__name__}: {first}", reason)
    return StoreUnusable(type(exc).__name__, "unavailable")
