"""The thread stores side by side: messages per second and store time per message.

    .venv/bin/python bench/stores.py [--stores sqlite,aiosqlite,redis,postgres,mariadb]
        [--visitors 16] [--messages 2000] [--history 30] [--json PATH]

One worker's event loop, as under gunicorn; ``--visitors`` coroutines each hold a thread and
send messages one after another. A message costs the store what the ChatKit SDK and our server
ask of it for one answer: load the thread, save the visitor's message, read the history
(newest ``--history`` items), save the answer, save the thread (its title and status).
Every store runs on a private server or file the bench starts (Redis, PostgreSQL and MariaDB in
temporary directories, fsync off for PostgreSQL and the redo log flushed once a second for
MariaDB, as on a test box, SQLite WAL with synchronous=NORMAL):
figures compare the stores' code paths on one machine, not durable production set-ups.

``aiosqlite`` is the SQL store (SQLAlchemy 2 Core, async engine) on ``sqlite+aiosqlite://``: the
measure behind keeping the embedded SQLite store for ``sqlite:///``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatkit.types import (  # noqa: E402
    AssistantMessageContent,
    AssistantMessageItem,
    InferenceOptions,
    ThreadMetadata,
    UserMessageItem,
    UserMessageTextContent,
)

from chatkit_flask.server.context import RequestContext  # noqa: E402
from chatkit_flask.server.store import OwnerScopedStore  # noqa: E402

T0 = datetime(2026, 12, 1, 12, 0, 0)
ANSWER = "A reply of a few sentences, about as long as a short answer is. " * 4


def open_bench_store(name: str, workdir: Path, servers: list[Any]) -> OwnerScopedStore:
    if name == "sqlite":
        from chatkit_flask.server.store_sqlite import SQLiteStore

        return SQLiteStore(workdir / "threads.db", 3600)
    if name == "aiosqlite":
        from chatkit_flask.server.sql_schema import upgrade
        from chatkit_flask.server.store_sql import SQLStore

        url = f"sqlite+aiosqlite:///{workdir}/threads-sql.db"
        upgrade(url)
        return SQLStore(url, 3600)
    if name == "redis":
        from chatkit_flask.server.store_redis import RedisStore
        from chatkit_flask.testing.redis_server import RedisServer

        server = RedisServer()
        server.start()
        servers.append(server)
        return RedisStore(server.url(0), 3600)
    if name in ("postgres", "mariadb"):
        from chatkit_flask.server.sql_schema import upgrade
        from chatkit_flask.server.store_sql import SQLStore
        from chatkit_flask.testing.mariadb_server import MariaDBServer
        from chatkit_flask.testing.postgres_server import PostgresServer

        database = PostgresServer() if name == "postgres" else MariaDBServer()
        database.start()
        servers.append(database)
        upgrade(database.url())  # PyMySQL for MariaDB; the store itself runs on aiomysql
        return SQLStore(database.url(), 3600, pool_size=10)
    raise SystemExit(f"unknown store {name!r}: sqlite, aiosqlite, redis, postgres or mariadb")


async def visitor(
    store: OwnerScopedStore, n: int, messages: int, history: int, took: list[float]
) -> None:
    context = RequestContext(owner=f"visitor:bench-{n}")
    thread = ThreadMetadata(id=store.generate_thread_id(context), created_at=T0)
    await store.save_thread(thread, context)
    for i in range(messages):
        at = T0 + timedelta(seconds=2 * i)
        started = time.perf_counter()
        loaded = await store.load_thread(thread.id, context)
        question = UserMessageItem(
            id=store.generate_item_id("message", loaded, context), thread_id=thread.id,
            created_at=at, content=[UserMessageTextContent(text=f"question {i}")],
            attachments=[], quoted_text=None, inference_options=InferenceOptions(),
        )  # fmt: skip
        await store.add_thread_item(thread.id, question, context)
        await store.load_thread_items(thread.id, None, history, "desc", context)
        answer = AssistantMessageItem(
            id=store.generate_item_id("message", loaded, context), thread_id=thread.id,
            created_at=at + timedelta(seconds=1), content=[AssistantMessageContent(text=ANSWER)],
        )  # fmt: skip
        await store.add_thread_item(thread.id, answer, context)
        await store.save_thread(loaded, context)
        took.append(time.perf_counter() - started)


async def measure(store: OwnerScopedStore, visitors: int, messages: int, history: int) -> dict:
    per_visitor = max(1, messages // visitors)
    await visitor(store, -1, 3, history, [])  # warm: connections, schema, pools
    took: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(*[visitor(store, n, per_visitor, history, took) for n in range(visitors)])
    elapsed = time.perf_counter() - started
    aclose = getattr(store, "aclose", None)
    if aclose is not None:
        await aclose()
    took.sort()
    return {
        "messages": len(took),
        "messages_per_s": round(len(took) / elapsed, 1),
        "store_ms_per_message_mean": round(statistics.fmean(took) * 1000, 2),
        "store_ms_per_message_p95": round(took[int(0.95 * (len(took) - 1))] * 1000, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stores", default="sqlite,aiosqlite,redis,postgres,mariadb")
    p.add_argument("--visitors", type=int, default=16, help="concurrent conversations")
    p.add_argument("--messages", type=int, default=2000, help="messages in all, per store")
    p.add_argument("--history", type=int, default=30, help="items read per message")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)

    rows: list[dict[str, Any]] = []
    for name in [s for s in args.stores.split(",") if s]:
        servers: list[Any] = []
        with tempfile.TemporaryDirectory(prefix="chatkit-bench-stores-") as workdir:
            try:
                store = open_bench_store(name, Path(workdir), servers)
                row = asyncio.run(measure(store, args.visitors, args.messages, args.history))
            finally:
                for server in servers:
                    server.stop()
        rows.append({"store": name, **row})
        print(f"  {name}: {row}", file=sys.stderr, flush=True)

    print(f"{args.visitors} concurrent visitors, one event loop, {args.history} items of history")
    print("| store | messages/s | store ms per message (mean) | p95 | messages |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['store']} | {row['messages_per_s']} | {row['store_ms_per_message_mean']} "
              f"| {row['store_ms_per_message_p95']} | {row['messages']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
