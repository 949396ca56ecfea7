"""Owner-scoped ChatKit stores that every worker process and host can share.

:func:`open_store` picks the implementation from ``CHATKIT_STORE_URL``:

- ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: a file next to the app, no
  service to run; every worker process of one host shares it (:class:`.SQLiteStore`).
- ``redis://``, ``rediss://`` or ``unix://``: several hosts share one Redis (:class:`.RedisStore`).
- ``postgresql+psycopg://`` (also ``mysql+pymysql://``, ``sqlite+aiosqlite:///``): the site's
  own database through SQLAlchemy, tables made by migrations (:class:`.SQLStore`).

The contract, the same for all (the SDK checks none of it, so the store must):

- Every read and write is scoped to ``context.owner``. Another owner's thread or item raises
  ``chatkit.store.NotFoundError``, exactly like a missing one; its content never leaves the store.
- Pages are ordered by ``created_at`` (ties by id); ``after`` is an exclusive id cursor that must
  belong to the same owner (or thread); ``Page.after`` is the last id returned when ``has_more``.
  A page holds at most :data:`MAX_PAGE_SIZE` records, whatever ``limit`` asks for.
- ``save_thread``, ``save_item`` and ``add_thread_item`` upsert; ``delete_thread`` removes the
  thread with all its items; ``delete_thread_item`` of an item that is not there does nothing.
- A thread not written for ``thread_ttl`` seconds is gone, with its items. The TTL is the
  current setting, applied to what is already stored: :meth:`~OwnerScopedStore.prune` deletes
  threads by their last activity (and re-expires Redis keys), so a shortened retention reaches
  old threads too.
- Ids are 128-bit random: ``thr_`` + 32 hex digits, items prefixed by type as the SDK does.
- Attachment metadata is owner-scoped like threads, in every store (SQLite, Redis and the SQL
  store): another owner's attachment is ``NotFoundError`` (and ``save_attachment`` never takes
  it over, nor attaches to a foreign thread). It goes with its thread (deleted, pruned, purged,
  moved); one never sent in a message is pruned ``thread_ttl`` after it was created. The bytes
  live apart (``server/files``): :meth:`known_attachments` and :meth:`owner_attachments` let
  purge and the orphan sweep delete them.
"""

from __future__ import annotations

import secrets
import sqlite3
from abc import abstractmethod
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

from chatkit.store import NotFoundError, Store, StoreItemType, default_generate_id
from chatkit.types import Attachment, Page, ThreadItem, ThreadMetadata
from pydantic import TypeAdapter
from redis.exceptions import RedisError

from chatkit_flask.server.context import RequestContext
from chatkit_flask.settings import ConfigError

__all__ = [
    "MAX_PAGE_SIZE",
    "STORE_URL_KEY",
    "NotFoundError",
    "OwnerScopedStore",
    "StoreUnusable",
    "add_store_error_type",
    "open_store",
    "store_error_types",
]

STORE_URL_KEY = "CHATKIT_STORE_URL"
MAX_PAGE_SIZE = 100  # a page request cannot make the store read a whole history at once
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
# SQLAlchemy URLs: "postgresql+psycopg", "mysql+pymysql", "sqlite+aiosqlite"... (plain "sqlite" is
# the embedded store).
SQL_BACKENDS = frozenset({"postgresql", "mysql", "mariadb", "sqlite"})
# What a store raises when it cannot be reached or used (Redis down, a file that cannot be opened).
# The SQL store adds SQLAlchemy's base error when it is imported: a process that uses another
# store never imports SQLAlchemy (~12 MB of memory in each worker).
_STORE_ERRORS: list[type[Exception]] = [RedisError, sqlite3.Error]


def store_error_types() -> tuple[type[Exception], ...]:
    """The exceptions a store raises when it cannot serve, for ``except store_error_types():``."""
    return tuple(_STORE_ERRORS)


def add_store_error_type(kind: type[Exception]) -> None:
    """Count ``kind`` as a store failure (a store module's own base error, at its import)."""
    if kind not in _STORE_ERRORS:
        _STORE_ERRORS.append(kind)


class StoreUnusable(Exception):
    """The store cannot serve. ``cause`` says why in words an operator can act on ("the
    directory /data does not exist", "permission denied: ..."), never a password; ``reason`` is
    a short fixed word for ``/readyz`` and metrics (``unreachable``, ``not_writable``, ...)."""

    def __init__(self, cause: str, reason: str = "unavailable") -> None:
        super().__init__(cause)
        self.cause = cause
        self.reason = reason


class _Identified(Protocol):
    id: str


Record = TypeVar("Record", bound=_Identified)

# Built once: building a TypeAdapter for the item union costs milliseconds.
ITEM_ADAPTER: TypeAdapter[ThreadItem] = TypeAdapter(ThreadItem)
ATTACHMENT_ADAPTER: TypeAdapter[Attachment] = TypeAdapter(Attachment)
_THREAD_FIELDS = frozenset(ThreadMetadata.model_fields)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class OwnerScopedStore(Store[RequestContext]):
    """What both stores share: strong ids, and the owner-wide operations that
    support and erasure commands use (they take an owner, not a request context)."""

    def __init__(self, thread_ttl: int) -> None:
        if isinstance(thread_ttl, bool) or not isinstance(thread_ttl, int) or thread_ttl < 1:
            raise ValueError(f"thread_ttl must be a positive number of seconds, got {thread_ttl!r}")
        self.thread_ttl = thread_ttl

    def generate_thread_id(self, context: RequestContext) -> str:
        return f"thr_{secrets.token_hex(16)}"

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: RequestContext
    ) -> str:
        return f"{_id_prefix(item_type)}_{secrets.token_hex(16)}"

    kind: str = "store"  # "sqlite", "redis": how logs name the store (never its URL)

    def __str__(self) -> str:
        return f"{self.kind} store"

    @abstractmethod
    async def probe(self, *, write: bool) -> None:
        """Raise :class:`StoreUnusable` unless the store answers. ``write=False`` is the cheap
        readiness check (a read, and whether a write could start); ``write=True`` is the start-up
        check (a real write transaction, undone)."""

    @abstractmethod
    async def list_owner_threads(self, owner: str) -> list[ThreadMetadata]:
        """Every live thread of ``owner``, oldest first."""

    @abstractmethod
    async def known_attachments(self, attachment_ids: list[str]) -> set[str]:
        """Which of ``attachment_ids`` have metadata, whoever owns them (the orphan sweep)."""

    @abstractmethod
    async def owner_attachments(self, owner: str) -> list[str]:
        """The ids of every attachment of ``owner`` (purge deletes their bytes first)."""

    @abstractmethod
    async def purge_owner(self, owner: str) -> int:
        """Delete every thread and item of ``owner``; return how many live threads were deleted."""

    @abstractmethod
    async def move_owner(self, source: str, target: str) -> int:
        """Give every live thread of ``source`` (with its items) to ``target``, atomically: a
        concurrent reader sees all of them moved or none. Returns how many threads moved."""

    @abstractmethod
    async def prune(self, now: float | None = None) -> int:
        """Delete every thread last written ``thread_ttl`` seconds or more before ``now`` (the
        store's clock by default), with its items; return how many. Redis also re-expires the
        threads that stay, from their last activity."""


@cache
def _id_prefix(item_type: StoreItemType) -> str:
    # The SDK's own generator knows the prefix of every item type, including future ones.
    return default_generate_id(item_type).partition("_")[0]


def sort_key(created_at: datetime) -> int:
    """Microseconds since the epoch, exact (a naive ``created_at`` is local time, as the SDK's
    ``datetime.now()`` is)."""
    return (created_at.astimezone(UTC) - _EPOCH) // _MICROSECOND


def thread_json(thread: ThreadMetadata) -> str:
    """The thread's metadata as JSON; the SDK sometimes passes a full ``Thread`` with items."""
    return thread.model_dump_json(include=set(_THREAD_FIELDS))


def check_page_args(limit: int, order: str) -> int:
    """The number of records a page may hold; refuses an unknown order."""
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
    return max(1, min(int(limit), MAX_PAGE_SIZE))


def make_page(records: list[Record], limit: int) -> Page[Record]:
    """A page from up to ``limit + 1`` records read in order (the extra one says ``has_more``)."""
    has_more = len(records) > limit
    data = records[:limit]
    return Page(data=data, has_more=has_more, after=data[-1].id if has_more else None)


def not_found(what: str, ident: str) -> NoReturn:
    raise NotFoundError(f"{what} {ident} not found")


def sql_database(url: str) -> str | None:
    """The database the SQL store at ``url`` runs on (``"postgresql"``, ``"mysql"``,
    ``"mariadb"``, ``"sqlite"``), or None when ``url`` names another store (plain
    ``sqlite://`` is the embedded store, ``sqlite+aiosqlite://`` the SQL one)."""
    scheme = url.strip().partition("://")[0].lower()
    backend, plus, _driver = scheme.partition("+")
    if backend in SQL_BACKENDS and (backend != "sqlite" or bool(plus)):
        return backend
    return None


def is_sql_url(url: str) -> bool:
    """Whether ``url`` names the SQL store (see :func:`sql_database`)."""
    return sql_database(url) is not None


def open_store(
    url: str, *, thread_ttl: int, table_prefix: str = "chatkit_", pool_size: int = 5,
    timeout: float = 10.0,
) -> OwnerScopedStore:  # fmt: skip
    """The store that ``url`` names. Nothing is connected or created until first use.
    ``table_prefix``, ``pool_size`` and ``timeout`` (seconds per statement) are the SQL store's.

    Raises ``ConfigError(STORE_URL_KEY, ...)`` for an unknown scheme or a malformed URL; the
    message never repeats a password from the URL.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            STORE_URL_KEY,
            "must be a URL such as sqlite:///chatkit.db or redis://host:6379/0",
        )
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (parses the port: a bad one raises ValueError)
    except ValueError:
        raise ConfigError(STORE_URL_KEY, f"malformed URL {mask_url(url)}") from None
    scheme = parts.scheme.lower()
    url = f"{scheme}://{url.strip().partition('://')[2]}"  # redis-py accepts lower case only
    if is_sql_url(url):
        return open_sql_store(
            url, thread_ttl=thread_ttl, table_prefix=table_prefix, pool_size=pool_size,
            timeout=timeout,
        )  # fmt: skip
    if scheme == "sqlite":
        from chatkit_flask.server.store_sqlite import SQLiteStore

        return SQLiteStore(_sqlite_path(url), thread_ttl)
    if scheme in REDIS_SCHEMES:
        from chatkit_flask.server.store_redis import RedisStore

        _check_redis_url(url)
        return RedisStore(url, thread_ttl)
    raise ConfigError(
        STORE_URL_KEY,
        f"unknown scheme in {mask_url(url)}; use sqlite:///path.db, redis://, rediss://, unix:// "
        "or postgresql+psycopg://",
    )


def open_sql_store(
    url: Any, *, thread_ttl: int, table_prefix: str, pool_size: int, timeout: float
) -> OwnerScopedStore:
    """The SQL store on ``url`` (a string or SQLAlchemy URL, sync or async driver); a
    ``ConfigError`` names the package to install or the problem with the URL."""
    try:
        from sqlalchemy import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        from chatkit_flask.server.store_sql import SQLStore, async_url
    except ImportError as exc:
        raise ConfigError(
            STORE_URL_KEY, f"needs the SQL store's packages ({exc.name} is missing): "
            'pip install "chatkit-flask[sql]"',
        ) from None  # fmt: skip
    shown = mask_url(str(url))  # a SQLAlchemy URL prints its password as ***
    try:
        driver = async_url(make_url(url))
    except (ArgumentError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) and "supported" in str(exc) else ""
        raise ConfigError(STORE_URL_KEY, f"malformed URL {shown} {reason}".strip()) from None
    try:
        driver.get_dialect().import_dbapi()  # the driver's package is installed
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            STORE_URL_KEY, f"{shown} needs the driver {driver.drivername} "
            f"({getattr(exc, 'name', None) or exc}); pip install it",
        ) from None  # fmt: skip
    return SQLStore(driver, thread_ttl, table_prefix=table_prefix, pool_size=pool_size,
                    timeout=timeout)  # fmt: skip


def _sqlite_path(url: str) -> Path:
    parts = urlsplit(url.strip())
    if parts.netloc or parts.query or parts.fragment:
        raise ConfigError(
            STORE_URL_KEY,
            f"{mask_url(url)}: use sqlite:///relative/path.db or sqlite:////absolute/path.db "
            "(no host, no options)",
        )
    path = unquote(parts.path[1:])  # "sqlite:///x.db" -> "x.db", "sqlite:////x.db" -> "/x.db"
    if not path or path == ":memory:":
        raise ConfigError(STORE_URL_KEY, "needs a database file that every worker process can open")
    from chatkit_flask.server.store_sqlite import directory_problem

    problem = directory_problem(Path(path).absolute().parent)
    if problem is not None:
        raise ConfigError(STORE_URL_KEY, problem)
    return Path(path)


def _check_redis_url(url: str) -> None:
    from redis.connection import parse_url

    parts = urlsplit(url.strip())
    database = parts.path.strip("/")
    # redis-py reads "redis://host/typo" as database 0: refuse it rather than share database 0.
    if parts.scheme.lower() != "unix" and database and not database.isdigit():
        raise ConfigError(
            STORE_URL_KEY, f"{mask_url(url)}: the path must be a database number, like /0"
        )
    try:
        parse_url(url.strip())
    except ValueError:
        # redis-py's message may quote the URL, password included: say only what we know.
        raise ConfigError(STORE_URL_KEY, f"malformed Redis URL {mask_url(url)}") from None


def mask_url(url: str) -> str:
    """``url`` fit for a message or a log: user info and query (which may hold a password)
    replaced by ``***``."""
    scheme, sep, rest = str(url).strip().partition("://")
    if not sep:
        return "<not a URL>"
    if "@" in rest:  # keep nothing before the last "@": a password may hold "/", "?" or "@"
        rest = "***@" + rest.rpartition("@")[2]
    rest, question, _query = rest.partition("?")
    return f"{scheme}://{rest}{'?***' if question else ''}"
