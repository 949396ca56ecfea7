"""The embedded store: one SQLite file that every worker process of one host shares.

Blocking ``sqlite3`` calls run in worker threads (``asyncio.to_thread``) so the event loop never
waits on the disk or on another process's write lock. Each thread has its own connection (opened
again after a fork); WAL lets readers proceed while one process writes, and ``busy_timeout`` makes a
writer wait for the lock instead of failing. SQLite has no native expiry: expired threads are
hidden from every read and deleted by :meth:`SQLiteStore.prune`.

Attachment metadata rows cascade with their thread (deleted, pruned or purged); one not yet
sent in a message is pruned ``thread_ttl`` after its creation.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from chatkit.types import Attachment, Page, ThreadItem, ThreadMetadata

from chatkit_flask.server.context import RequestContext
from chatkit_flask.server.store import (
    ATTACHMENT_ADAPTER,
    ITEM_ADAPTER,
    OwnerScopedStore,
    StoreUnusable,
    check_page_args,
    make_page,
    not_found,
    sort_key,
    thread_json,
)

__all__ = ["SQLiteStore", "directory_problem"]

BUSY_TIMEOUT_MS = 10_000  # how long a writer waits for another process's transaction
READY_TIMEOUT_S = 1.0  # /readyz: a write lock held longer than this is reported, not waited for

# Items cascade with their thread: deleting or pruning a thread is one statement.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS chatkit_threads (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chatkit_threads_by_owner
    ON chatkit_threads (owner, created_us, id);
CREATE INDEX IF NOT EXISTS chatkit_threads_by_activity ON chatkit_threads (updated_at);
CREATE TABLE IF NOT EXISTS chatkit_items (
    thread_id TEXT NOT NULL REFERENCES chatkit_threads (id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (thread_id, id)
);
CREATE INDEX IF NOT EXISTS chatkit_items_by_thread
    ON chatkit_items (thread_id, created_us, id);
CREATE TABLE IF NOT EXISTS chatkit_attachments (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    thread_id TEXT REFERENCES chatkit_threads (id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chatkit_attachments_by_owner ON chatkit_attachments (owner);
CREATE INDEX IF NOT EXISTS chatkit_attachments_by_thread ON chatkit_attachments (thread_id);
CREATE INDEX IF NOT EXISTS chatkit_attachments_unsent
    ON chatkit_attachments (created_at) WHERE thread_id IS NULL;
"""

_P = ParamSpec("_P")
_R = TypeVar("_R")


class SQLiteStore(OwnerScopedStore):
    """Threads and items in the SQLite file at ``path`` (tables created on first use).

    ``clock`` (seconds, like ``time.time``) decides expiry; tests inject a fake one.
    Safe to share between threads and forked processes.
    """

    kind = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        thread_ttl: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(thread_ttl)
        self.path = Path(path).absolute()  # a later chdir must not open another file
        self._clock = clock
        self._local = threading.local()
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the file in use

    # -- ChatKit Store --------------------------------------------------------------------------

    async def load_thread(self, thread_id: str, context: RequestContext) -> ThreadMetadata:
        return await self._run(self._load_thread, thread_id, context.owner)

    async def save_thread(self, thread: ThreadMetadata, context: RequestContext) -> None:
        await self._run(self._save_thread, thread, context.owner)

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: RequestContext
    ) -> Page[ThreadMetadata]:
        return await self._run(self._load_threads, limit, after, order, context.owner)

    async def delete_thread(self, thread_id: str, context: RequestContext) -> None:
        await self._run(self._delete_thread, thread_id, context.owner)

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: RequestContext
    ) -> Page[ThreadItem]:
        return await self._run(self._load_items, thread_id, after, limit, order, context.owner)

    async def add_thread_item(
        self, thread_id: str, item: ThreadItem, context: RequestContext
    ) -> None:
        await self._run(self._put_item, thread_id, item, context.owner)

    async def save_item(self, thread_id: str, item: ThreadItem, context: RequestContext) -> None:
        await self._run(self._put_item, thread_id, item, context.owner)

    async def load_item(self, thread_id: str, item_id: str, context: RequestContext) -> ThreadItem:
        return await self._run(self._load_item, thread_id, item_id, context.owner)

    async def delete_thread_item(
        self, thread_id: str, item_id: str, context: RequestContext
    ) -> None:
        await self._run(self._delete_item, thread_id, item_id, context.owner)

    async def save_attachment(self, attachment: Attachment, context: RequestContext) -> None:
        await self._run(self._save_attachment, attachment, context.owner)

    async def load_attachment(self, attachment_id: str, context: RequestContext) -> Attachment:
        return await self._run(self._load_attachment, attachment_id, context.owner)

    async def delete_attachment(self, attachment_id: str, context: RequestContext) -> None:
        await self._run(self._delete_attachment, attachment_id, context.owner)

    # -- owner-wide operations ------------------------------------------------------------------

    async def known_attachments(self, attachment_ids: list[str]) -> set[str]:
        return await self._run(self._known_attachments, attachment_ids)

    async def owner_attachments(self, owner: str) -> list[str]:
        return await self._run(self._owner_attachments, owner)

    async def list_owner_threads(self, owner: str) -> list[ThreadMetadata]:
        return await self._run(self._list_owner_threads, owner)

    async def purge_owner(self, owner: str) -> int:
        return await self._run(self._purge_owner, owner)

    async def prune(self, now: float | None = None) -> int:
        return await self._run(self._prune, self._clock() if now is None else now)

    async def move_owner(self, source: str, target: str) -> int:
        return await self._run(self._move_owner, source, target)

    async def probe(self, *, write: bool) -> None:
        await self._run(self._probe_write if write else self._probe_ready)

    # -- blocking implementations (worker threads) -----------------------------------------------

    def _probe_write(self) -> None:
        """Open (creating the file if needed), create the tables and write and delete one row in
        one transaction: what every answer will do, so a store that cannot do it stops start-up
        with the reason instead of failing every conversation later."""
        problem = directory_problem(self.path.parent) or _file_problem(self.path)
        if problem is not None:
            raise StoreUnusable(problem, "not_writable")
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise _unusable(exc, self.path) from None
        probe_id = f"probe_{secrets.token_hex(8)}"
        try:
            _prepare(db)
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO chatkit_threads (id, owner, created_us, updated_at, expires_at, data)"
                " VALUES (?, '', 0, 0, 0, '{}')",
                (probe_id,),
            )
            db.execute("DELETE FROM chatkit_threads WHERE id = ?", (probe_id,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _unusable(exc, self.path) from None
        finally:
            db.close()

    def _probe_ready(self) -> None:
        """A read, and a write lock taken and released at once (never waiting long for it): cheap
        enough for a health check every few seconds. Never creates the file."""
        if not self.path.is_file():
            raise StoreUnusable(f"{self.path} no longer exists", "not_writable")
        try:
            self._check_same_file()
        except DatabaseFileChanged as exc:
            raise StoreUnusable(str(exc), "not_writable") from None
        if not os.access(self.path, os.W_OK):
            raise StoreUnusable(_fs_cause(self.path, errno.EACCES, ""), "not_writable")
        try:
            db = sqlite3.connect(
                f"file:{self.path}?mode=rw", uri=True, timeout=READY_TIMEOUT_S,
                isolation_level=None,
            )  # fmt: skip
        except sqlite3.Error as exc:
            raise _unusable(exc, self.path) from None
        try:
            db.execute("SELECT 1 FROM chatkit_threads LIMIT 1").fetchall()
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise _unusable(exc, self.path, lock_wait=READY_TIMEOUT_S) from None
        finally:
            db.close()


    def _load_thread(self, thread_id: str, owner: str) -> ThreadMetadata:
        row = (
            self._connection()
            .execute(
                "SELECT data FROM chatkit_threads WHERE id = ? AND owner = ? AND updated_at > ?",
                (thread_id, owner, self._active_since()),
            )
            .fetchone()
        )
        if row is None:
            not_found("thread", thread_id)
        return ThreadMetadata.model_validate_json(row[0])

    def _save_thread(self, thread: ThreadMetadata, owner: str) -> None:
        now = self._clock()
        with self._transaction(write=True) as db:
            row = db.execute(
                "SELECT owner, updated_at FROM chatkit_threads WHERE id = ?", (thread.id,)
            ).fetchone()
            if row is not None and row[1] <= now - self.thread_ttl:
                # Expired but not pruned yet: it is gone, so its items must not come back.
                db.execute("DELETE FROM chatkit_threads WHERE id = ?", (thread.id,))
            elif row is not None and row[0] != owner:
                not_found("thread", thread.id)
            # An upsert, never INSERT OR REPLACE: a replace deletes the row and cascades to items.
            db.execute(
                """INSERT INTO chatkit_threads (id, owner, created_us, updated_at, expires_at, data)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (id) DO UPDATE SET created_us = excluded.created_us,
                    updated_at = excluded.updated_at, expires_at = excluded.expires_at,
                    data = excluded.data""",
                (
                    thread.id,
                    owner,
                    sort_key(thread.created_at),
                    now,
                    now + self.thread_ttl,
                    thread_json(thread),
                ),
            )

    def _load_threads(
        self, limit: int, after: str | None, order: str, owner: str
    ) -> Page[ThreadMetadata]:
        limit = check_page_args(limit, order)
        with self._transaction(write=False) as db:
            since = self._active_since()
            rows = _page_rows(
                db, "chatkit_threads", "owner = ? AND updated_at > ?", [owner, since],
                "id = ? AND owner = ?", (after, owner), "thread", after, limit, order,
            )  # fmt: skip
        return make_page([ThreadMetadata.model_validate_json(row[0]) for row in rows], limit)

    def _delete_thread(self, thread_id: str, owner: str) -> None:
        with self._transaction(write=True) as db:
            self._require_thread(db, thread_id, owner)
            db.execute("DELETE FROM chatkit_threads WHERE id = ?", (thread_id,))

    def _load_items(
        self, thread_id: str, after: str | None, limit: int, order: str, owner: str
    ) -> Page[ThreadItem]:
        limit = check_page_args(limit, order)
        with self._transaction(write=False) as db:
            self._require_thread(db, thread_id, owner)
            rows = _page_rows(
                db, "chatkit_items", "thread_id = ? AND owner = ?", [thread_id, owner],
                "thread_id = ? AND id = ?", (thread_id, after), "item", after, limit, order,
            )  # fmt: skip
        return make_page([ITEM_ADAPTER.validate_json(row[0]) for row in rows], limit)

    def _put_item(self, thread_id: str, item: ThreadItem, owner: str) -> None:
        now = self._clock()
        with self._transaction(write=True) as db:
            self._require_thread(db, thread_id, owner)
            db.execute(
                """INSERT INTO chatkit_items (thread_id, id, owner, created_us, updated_at, data)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (thread_id, id) DO UPDATE SET created_us = excluded.created_us,
                    updated_at = excluded.updated_at, data = excluded.data""",
                (thread_id, item.id, owner, sort_key(item.created_at), now, item.model_dump_json()),
            )
            self._touch(db, thread_id, now)

    def _load_item(self, thread_id: str, item_id: str, owner: str) -> ThreadItem:
        with self._transaction(write=False) as db:
            self._require_thread(db, thread_id, owner)
            row = db.execute(
                "SELECT data FROM chatkit_items WHERE thread_id = ? AND id = ? AND owner = ?",
                (thread_id, item_id, owner),
            ).fetchone()
        if row is None:
            not_found("item", item_id)
        return ITEM_ADAPTER.validate_json(row[0])

    def _delete_item(self, thread_id: str, item_id: str, owner: str) -> None:
        now = self._clock()
        with self._transaction(write=True) as db:
            self._require_thread(db, thread_id, owner)
            db.execute(
                "DELETE FROM chatkit_items WHERE thread_id = ? AND id = ?", (thread_id, item_id)
            )
            self._touch(db, thread_id, now)

    def _save_attachment(self, attachment: Attachment, owner: str) -> None:
        with self._transaction(write=True) as db:
            row = db.execute(
                "SELECT owner FROM chatkit_attachments WHERE id = ?", (attachment.id,)
            ).fetchone()
            if row is not None and row[0] != owner:
                not_found("attachment", attachment.id)
            if attachment.thread_id is not None:
                self._require_thread(db, attachment.thread_id, owner)
            db.execute(
                """INSERT INTO chatkit_attachments (id, owner, thread_id, created_at, data)
                VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (id) DO UPDATE SET thread_id = excluded.thread_id,
                    data = excluded.data""",
                (attachment.id, owner, attachment.thread_id, self._clock(),
                 attachment.model_dump_json()),
            )  # fmt: skip

    def _load_attachment(self, attachment_id: str, owner: str) -> Attachment:
        row = (
            self._connection()
            .execute(
                "SELECT data FROM chatkit_attachments WHERE id = ? AND owner = ?",
                (attachment_id, owner),
            )
            .fetchone()
        )
        if row is None:
            not_found("attachment", attachment_id)
        return ATTACHMENT_ADAPTER.validate_json(row[0])

    def _delete_attachment(self, attachment_id: str, owner: str) -> None:
        with self._transaction(write=True) as db:
            db.execute(
                "DELETE FROM chatkit_attachments WHERE id = ? AND owner = ?", (attachment_id, owner)
            )

    def _known_attachments(self, attachment_ids: list[str]) -> set[str]:
        known: set[str] = set()
        db = self._connection()
        for start in range(0, len(attachment_ids), 500):
            batch = attachment_ids[start : start + 500]
            marks = ",".join("?" * len(batch))
            query = f"SELECT id FROM chatkit_attachments WHERE id IN ({marks})"  # noqa: S608
            rows = db.execute(query, batch)  # only placeholders are formatted in
            known.update(row[0] for row in rows)
        return known

    def _owner_attachments(self, owner: str) -> list[str]:
        rows = self._connection().execute(
            "SELECT id FROM chatkit_attachments WHERE owner = ? ORDER BY id", (owner,)
        )
        return [row[0] for row in rows]

    def _list_owner_threads(self, owner: str) -> list[ThreadMetadata]:
        rows = (
            self._connection()
            .execute(
                "SELECT data FROM chatkit_threads WHERE owner = ? AND updated_at > ?"
                " ORDER BY created_us, id",
                (owner, self._active_since()),
            )
            .fetchall()
        )
        return [ThreadMetadata.model_validate_json(row[0]) for row in rows]

    def _purge_owner(self, owner: str) -> int:
        with self._transaction(write=True) as db:
            (live,) = db.execute(
                "SELECT COUNT(*) FROM chatkit_threads WHERE owner = ? AND updated_at > ?",
                (owner, self._active_since()),
            ).fetchone()
            db.execute("DELETE FROM chatkit_threads WHERE owner = ?", (owner,))  # items cascade
            db.execute("DELETE FROM chatkit_attachments WHERE owner = ?", (owner,))
        return int(live)

    def _prune(self, now: float) -> int:
        with self._transaction(write=True) as db:
            db.execute(  # never sent in a message
                "DELETE FROM chatkit_attachments WHERE thread_id IS NULL AND created_at <= ?",
                (now - self.thread_ttl,),
            )
            return db.execute(
                "DELETE FROM chatkit_threads WHERE updated_at <= ?", (now - self.thread_ttl,)
            ).rowcount  # items and attachments cascade

    def _move_owner(self, source: str, target: str) -> int:
        """One write transaction: a concurrent reader sees every thread moved or none."""
        with self._transaction(write=True) as db:
            live = db.execute(
                "UPDATE chatkit_threads SET owner = ? WHERE owner = ? AND updated_at > ?",
                (target, source, self._active_since()),
            ).rowcount
            db.execute(
                "UPDATE chatkit_items SET owner = ? WHERE owner = ? AND thread_id IN"
                " (SELECT id FROM chatkit_threads WHERE owner = ?)",
                (target, source, target),
            )
            db.execute(
                "UPDATE chatkit_attachments SET owner = ? WHERE owner = ? AND (thread_id IS NULL"
                " OR thread_id IN (SELECT id FROM chatkit_threads WHERE owner = ?))",
                (target, source, target),
            )
        return live

    def _active_since(self) -> float:
        """A thread last written at or before this moment is gone: the *current* TTL applies
        to every stored thread, so a shortened retention shortens the old threads' lives too."""
        return self._clock() - self.thread_ttl

    def _require_thread(self, db: sqlite3.Connection, thread_id: str, owner: str) -> None:
        row = db.execute(
            "SELECT 1 FROM chatkit_threads WHERE id = ? AND owner = ? AND updated_at > ?",
            (thread_id, owner, self._active_since()),
        ).fetchone()
        if row is None:
            not_found("thread", thread_id)

    def _touch(self, db: sqlite3.Connection, thread_id: str, now: float) -> None:
        db.execute(
            "UPDATE chatkit_threads SET updated_at = ?, expires_at = ? WHERE id = ?",
            (now, now + self.thread_ttl, thread_id),
        )

    # -- connections ------------------------------------------------------------------------------

    async def _run(self, func: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return await asyncio.to_thread(self._healing, func, *args, **kwargs)

    def _healing(self, func: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
        """``func`` in this worker thread; after a database error its connection is dropped,
        so the next use opens a fresh one (a file opened read-only stays read-only; a fault
        healed outside must heal here too)."""
        try:
            return func(*args, **kwargs)
        except sqlite3.Error:
            self._drop_connection()
            raise

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and again in a forked child: a
        connection must never cross a fork, and after a failure: see :meth:`_transaction`).
        Every use checks that the file is still the one first opened (one ``stat``)."""
        self._check_same_file()
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        # Autocommit mode: transactions are explicit (see _transaction).
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            _prepare(db)
        except BaseException:
            db.close()
            raise
        if self._file_id is None:
            self._file_id = _identity(self.path)
        self._local.held = (os.getpid(), db)
        return db

    def _check_same_file(self) -> None:
        """Refuse to go on when the database file was deleted or replaced under the server:
        connections still open would serve the old file and new ones a new, empty one."""
        if self._file_id is None:
            return
        try:
            now = _identity(self.path)
        except FileNotFoundError:
            raise DatabaseFileChanged(f"{self.path} was deleted while the server ran") from None
        if now != self._file_id:
            raise DatabaseFileChanged(f"{self.path} was replaced while the server ran")

    def _drop_connection(self) -> None:
        """Close and forget this thread's connection."""
        held = getattr(self._local, "held", None)
        self._local.held = None
        if held is not None and held[0] == os.getpid():
            with suppress(sqlite3.Error):
                held[1].close()

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction. A writer takes the write lock at BEGIN: upgrading a read transaction
        later can fail at once with SQLITE_BUSY, which busy_timeout does not retry."""
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # also after a failed COMMIT: never leave one open
                with suppress(sqlite3.Error):  # the connection is dropped after an error anyway
                    db.execute("ROLLBACK")
            raise


def _prepare(db: sqlite3.Connection) -> None:
    """A new connection's settings, and the tables if the file has none yet.

    Several processes opening a new file at once (gunicorn's workers starting) may get
    SQLITE_BUSY here at once, without ``busy_timeout``'s wait: switching the file to WAL or
    creating a table while another connection does the same is refused where waiting could
    deadlock. Each step is idempotent, so it is tried again after a short random pause,
    for as long as ``busy_timeout`` would have waited.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")  # persistent in the file; cheap to repeat
            db.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable across a process crash
            db.execute("PRAGMA foreign_keys = ON")  # per connection; items cascade with threads
            db.executescript(_SCHEMA)
            return
        except sqlite3.OperationalError as exc:
            name = getattr(exc, "sqlite_errorname", "") or ""
            if not name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                raise
            if time.monotonic() >= deadline:
                raise
            if db.in_transaction:
                db.execute("ROLLBACK")
            time.sleep(random.uniform(0.01, 0.05))


class DatabaseFileChanged(sqlite3.DatabaseError):
    """The SQLite file in use was deleted or replaced: a store error, never served around."""


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


_AFTER = {
    "asc": " AND (created_us, id) > (?, ?)",
    "desc": " AND (created_us, id) < (?, ?)",
}
_ORDER_BY = {"asc": "ORDER BY created_us, id", "desc": "ORDER BY created_us DESC, id DESC"}


def _page_rows(
    db: sqlite3.Connection,
    table: str,
    scope: str,
    params: list[Any],
    cursor_scope: str,
    cursor_params: tuple[Any, ...],
    kind: str,
    after: str | None,
    limit: int,
    order: str,
) -> list[Any]:
    """Up to ``limit + 1`` rows of ``table`` within ``scope``, in creation ``order``, after the
    ``after`` record (found within ``cursor_scope``; missing or foreign: NotFoundError)."""
    where, params = scope, list(params)
    if after is not None:
        cursor = db.execute(
            f"SELECT created_us, id FROM {table} WHERE {cursor_scope}",  # noqa: S608 (fixed fragments)
            cursor_params,
        ).fetchone()
        if cursor is None:
            not_found(kind, after)
        where += _AFTER[order]
        params += cursor
    return db.execute(
        f"SELECT data FROM {table} WHERE {where} {_ORDER_BY[order]} LIMIT ?",  # noqa: S608 (fixed fragments)
        (*params, limit + 1),
    ).fetchall()


# -- diagnosis: why a file cannot be used, in words an operator can act on ---------------------

_ERRNO_CAUSES = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
}
_SQLITE_CAUSES = {
    "SQLITE_FULL": ("disk full", "not_writable"),
    "SQLITE_READONLY": ("the database is read-only (file permissions or a read-only file system)",
                        "not_writable"),
    "SQLITE_NOTADB": ("the file is not a SQLite database", "not_a_database"),
    "SQLITE_CORRUPT": ("the database file is corrupt", "not_a_database"),
    "SQLITE_PERM": ("permission denied", "not_writable"),
    "SQLITE_IOERR": ("an I/O error on the disk", "io_error"),
}  # fmt: skip


def directory_problem(directory: Path) -> str | None:
    """Why no database file can live in ``directory`` (absolute), or None: the first part of
    the path that is missing or not a directory, or a directory we may not write to."""
    for part in (*reversed(directory.parents), directory):
        try:
            exists, is_dir = part.exists(), part.is_dir()
        except PermissionError:  # a parent we may not enter
            return f"permission denied: {part.parent} may not be entered"
        if not exists:
            return f"the directory {part} does not exist"
        if not is_dir:
            return f"{part} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return _fs_cause(directory, errno.EACCES, f"cannot create files in {directory}")
    return None


def _file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be opened for writing (created when missing), or None. Tries it, as
    SQLite will: ``os.access`` says yes to root even where the file system says no."""
    if path.is_dir():
        return f"{path} is a directory"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # the directory exists: it holds no ordinary files
            return f"cannot create {path.name} in {path.parent} (not an ordinary directory)"
        return _fs_cause(path, exc.errno, f"cannot open {path}: {exc.strerror}")
    os.close(fd)
    return None


def _fs_cause(path: Path, code: int | None, fallback: str) -> str:
    try:
        if os.statvfs(path if path.exists() else path.parent).f_flag & os.ST_RDONLY:
            return f"read-only file system at {path}"
    except OSError:
        pass
    cause = _ERRNO_CAUSES.get(code or 0)
    return f"{cause}: {path}" if cause else fallback


def _unusable(exc: sqlite3.Error, path: Path, *, lock_wait: float | None = None) -> StoreUnusable:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
        wait = BUSY_TIMEOUT_MS / 1000 if lock_wait is None else lock_wait
        return StoreUnusable(
            f"{path} is locked by another connection for longer than {wait:g} s", "locked"
        )
    for prefix, (cause, reason) in _SQLITE_CAUSES.items():
        if name.startswith(prefix):
            return StoreUnusable(f"{cause}: {path}", reason)
    return StoreUnusable(f"cannot use {path}: {exc} ({name or type(exc).__name__})", "unavailable")
