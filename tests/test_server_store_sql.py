"""What is the SQL store's own (the contract it shares with the other stores is checked in
test_server_store.py and test_server_mode.py): its tables come from the shipped migrations and
nowhere else, start-up refuses tables that are behind and names the command, a Flask-SQLAlchemy
site hands its database over in one line, attachments are owner-scoped, a statement that waits
too long fails within the deadline, and a PostgreSQL restart mid-conversation costs one readable
error event and no more.

Everything runs against real servers the suite starts itself: PostgreSQL and MariaDB (one fresh
database per test on the suite's server, or the store's tables emptied; a private PostgreSQL for
the restarts).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit")
pytest.importorskip("psycopg")

import sqlalchemy as sa
from chatkit.store import NotFoundError
from chatkit.types import FileAttachment, ImageAttachment, ThreadMetadata
from flask import Flask

from chatkit_flask import ChatKit
from chatkit_flask.server.context import RequestContext
from chatkit_flask.server.sql_schema import current_revision, head_revision, upgrade
from chatkit_flask.server.store_sql import SQLStore
from chatkit_flask.settings import ConfigError
from chatkit_flask.testing.fake_responses import FakeResponses
from chatkit_flask.testing.mariadb_server import MariaDBServer
from chatkit_flask.testing.postgres_server import PostgresServer
from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.server_support import sse_events, user_input
from tests.services import start_mysql_or_skip, start_postgres_or_skip
from tests.test_server_mode import URL, close_app, server_config

POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)
MYSQL = pytest.param("mysql", marks=pytest.mark.mysql)
ROOT = Path(__file__).resolve().parents[1]
ALICE = RequestContext(owner="visitor:alice")
BOB = RequestContext(owner="user:bob")


@pytest.fixture
def new_database(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Makes new, empty databases on the suite's PostgreSQL (``"postgres"``) or MariaDB
    (``"mysql"``), dropped afterwards."""
    made: list[tuple[sa.Engine, str]] = []

    def make(kind: str) -> str:
        name = f"t_{secrets.token_hex(6)}"
        if kind == "postgres":
            server: Any = request.getfixturevalue("postgres_server")
            admin_url, drop = server.url(database="postgres"), f"DROP DATABASE {name} WITH (FORCE)"
        else:
            pytest.importorskip("aiomysql")
            server = request.getfixturevalue("mysql_server")
            admin_url, drop = server.url(), f"DROP DATABASE {name}"
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as db:
            db.execute(sa.text(f"CREATE DATABASE {name}"))
        made.append((admin, drop))
        return server.url(database=name)

    yield make
    for admin, drop in made:
        with admin.connect() as db:
            db.execute(sa.text(drop))
        admin.dispose()


@pytest.fixture(params=[POSTGRES, MYSQL])
def fresh_database(request: pytest.FixtureRequest, new_database: Callable[[str], str]) -> str:
    """A new, empty database on the suite's PostgreSQL, then on its MariaDB."""
    return new_database(request.param)


@pytest.fixture(params=[POSTGRES, MYSQL])
def sql_tables(request: pytest.FixtureRequest) -> str:
    """The store's tables, empty, on the suite's PostgreSQL, then on its MariaDB."""
    return request.getfixturevalue(f"{request.param}_tables")


def table_names(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def chat(client: Any, text: str, thread_id: str | None = None) -> list[dict[str, Any]]:
    body: dict[str, Any] = (
        {"type": "threads.add_user_message", "params": {"thread_id": thread_id,
                                                         "input": user_input(text)}}
        if thread_id
        else {"type": "threads.create", "params": {"input": user_input(text)}}
    )  # fmt: skip
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return sse_events(response.get_data())


# -- migrations ----------------------------------------------------------------------------------


def test_the_migrations_make_the_tables_under_the_prefix_and_only_those(
    fresh_database: str,
) -> None:
    engine = sa.create_engine(fresh_database, poolclass=sa.NullPool)
    with engine.begin() as db:  # the site's own tables and its own Alembic history
        db.execute(sa.text("CREATE TABLE users (id integer primary key)"))
        db.execute(sa.text("CREATE TABLE alembic_version (version_num varchar(32) primary key)"))
        db.execute(sa.text("INSERT INTO alembic_version VALUES ('site_rev_7')"))

    assert upgrade(fresh_database, "site_chat_") == head_revision()
    assert upgrade(fresh_database, "site_chat_") == head_revision()  # again: nothing to do

    assert table_names(fresh_database) == {
        "users", "alembic_version", "site_chat_threads", "site_chat_items",
        "site_chat_attachments", "site_chat_alembic_version",
    }  # fmt: skip
    with engine.connect() as db:
        assert db.scalar(sa.text("SELECT version_num FROM alembic_version")) == "site_rev_7"
        assert current_revision(db, "site_chat_") == head_revision()
        indexes = {i["name"] for i in sa.inspect(db).get_indexes("site_chat_threads")}
    assert {"site_chat_threads_by_owner", "site_chat_threads_by_activity"} <= indexes
    engine.dispose()


@pytest.mark.parametrize("database", [POSTGRES, MYSQL, "sqlite"])
def test_0002_gives_attachments_written_under_0001_their_thread(
    database: str, new_database: Callable[[str], str], tmp_path: Path
) -> None:
    """A site that ran 0001 keeps its attachments: one sent in a message of the same owner's
    thread now goes with that thread; one naming another owner's thread, or none, counts as
    never sent; the time it was written becomes its creation."""
    url = new_database(database) if database != "sqlite" else f"sqlite:///{tmp_path / 'site.db'}"
    assert upgrade(url, "chatkit_", "0001") == "0001"
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.begin() as db:
        db.execute(sa.text("INSERT INTO chatkit_threads VALUES ('thr_a', 'alice', 1, 5, '{}')"))
        db.execute(sa.text("INSERT INTO chatkit_threads VALUES ('thr_b', 'bob', 1, 5, '{}')"))
        for ident, owner, thread_id in (
            ("atc_sent", "alice", "thr_a"), ("atc_foreign", "alice", "thr_b"),
            ("atc_unsent", "alice", None),
        ):  # fmt: skip
            data = json.dumps({"id": ident, "thread_id": thread_id})
            db.execute(
                sa.text("INSERT INTO chatkit_attachments VALUES (:id, :owner, 7, :data)"),
                {"id": ident, "owner": owner, "data": data},
            )
    assert upgrade(url, "chatkit_") == head_revision()
    with engine.begin() as db:
        rows = db.execute(
            sa.text("SELECT id, thread_id, created_at FROM chatkit_attachments ORDER BY id")
        ).all()
        assert [tuple(row) for row in rows] == [
            ("atc_foreign", None, 7), ("atc_sent", "thr_a", 7), ("atc_unsent", None, 7)
        ]  # fmt: skip
        if database == "sqlite":
            db.execute(sa.text("PRAGMA foreign_keys = ON"))
        db.execute(sa.text("DELETE FROM chatkit_threads WHERE id = 'thr_a'"))
        left = db.execute(sa.text("SELECT id FROM chatkit_attachments ORDER BY id")).scalars()
        assert list(left) == ["atc_foreign", "atc_unsent"]
    engine.dispose()


def test_the_migrations_read_as_sql_for_each_database() -> None:
    """What `flask chatkit db upgrade --sql` prints: the same tables in each dialect (MySQL's
    documents in MEDIUMTEXT: TEXT holds 64 KB), ending at this version's revision."""
    from chatkit_flask.server.sql_schema import upgrade_sql

    head = head_revision()
    for url, document in (
        ("postgresql+psycopg://u@h/db", "data TEXT NOT NULL"),
        ("mysql+pymysql://u@h/db", "data MEDIUMTEXT NOT NULL"),
        ("sqlite:///x.db", "data TEXT NOT NULL"),
    ):
        script = upgrade_sql(url, "site_chat_")
        for table in ("threads", "items", "attachments", "alembic_version"):
            assert f"CREATE TABLE site_chat_{table} " in script, (url, table)
        assert document in script, url
        assert "REFERENCES site_chat_threads (id) ON DELETE CASCADE" in script, url
        # 0002: attachments follow their thread (a cascading thread_id; age from creation).
        upgrade_0002 = script.partition("-- Running upgrade 0001 -> 0002")[2]
        assert "ADD COLUMN thread_id VARCHAR(64)" in upgrade_0002, url
        assert upgrade_0002.count("REFERENCES site_chat_threads (id) ON DELETE CASCADE") == 1, url
        assert "created_at" in upgrade_0002 and "site_chat_attachments_by_thread" in upgrade_0002
        last_step = script.rpartition("UPDATE site_chat_alembic_version")[2]
        assert last_step.startswith(f" SET version_num='{head}'"), url


def test_prune_is_an_index_scan(sql_tables: str) -> None:
    """``flask chatkit prune`` deletes threads by last activity and unsent attachments by age:
    each database plans both on an index (the attachments of a thread cascade on another)."""
    engine = sa.create_engine(sql_tables, poolclass=sa.NullPool)
    with engine.begin() as db:
        if db.dialect.name == "postgresql":  # a tiny table: ask for the plan
            db.execute(sa.text("SET LOCAL enable_seqscan = off"))
        for statement, index in (
            ("DELETE FROM chatkit_threads WHERE updated_at <= 12345", "threads_by_activity"),
            ("DELETE FROM chatkit_attachments WHERE thread_id IS NULL AND created_at <= 12345",
             "attachments_by_thread"),
            ("DELETE FROM chatkit_attachments WHERE thread_id = 'thr_x'", "attachments_by_thread"),
        ):  # fmt: skip
            plan = db.execute(sa.text(f"EXPLAIN {statement}"))
            if db.dialect.name == "postgresql":
                assert f"chatkit_{index}" in "\n".join(plan.scalars()), statement
            else:  # MySQL: one row per table, the index it uses in "key"
                assert [row.key for row in plan] == [f"chatkit_{index}"], statement
    engine.dispose()


def test_start_up_refuses_tables_that_are_behind_and_creates_none(fresh_database: str) -> None:
    with FakeResponses(api_key=TEST_API_KEY) as fake:
        from chatkit_flask.service import create_app

        with pytest.raises(ConfigError) as refused:
            create_app(server_config(fake, fresh_database), environ={})

    assert refused.value.key == "CHATKIT_STORE_URL"
    message = str(refused.value)
    assert "missing" in message and "run `flask chatkit db upgrade`" in message
    assert table_names(fresh_database) == set()  # never created silently


def _flask(args: list[str], url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``flask --app wsgi chatkit ...`` as an operator runs it, on the standalone service."""
    (tmp_path / "empty.env").touch()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "OPENAI_"))},
        "CHATKIT_BACKEND": "server",
        "CHATKIT_STORE_URL": url,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",  # never called
        "SECRET_KEY": TEST_SECRET_KEY,
        "RATELIMIT_STORAGE_URI": "memory://",
        "CHATKIT_ENV_FILE": str(tmp_path / "empty.env"),
    }
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_flask_chatkit_db_upgrade_and_current(fresh_database: str, tmp_path: Path) -> None:
    """The commands run although start-up refuses the tables (the app loads first); every
    other command is still refused until the upgrade."""
    before = _flask(["chatkit", "db", "current"], fresh_database, tmp_path)
    script = _flask(["chatkit", "db", "upgrade", "--sql"], fresh_database, tmp_path)
    refused = _flask(["chatkit", "threads", "--visitor", "x"], fresh_database, tmp_path)
    upgraded = _flask(["chatkit", "db", "upgrade"], fresh_database, tmp_path)
    after = _flask(["chatkit", "db", "current"], fresh_database, tmp_path)
    served = _flask(["chatkit", "threads", "--visitor", "x"], fresh_database, tmp_path)

    head = head_revision()
    assert before.returncode == 1, before.stderr
    assert "at nothing (never created)" in before.stdout
    assert "CREATE TABLE chatkit_threads" in script.stdout, script.stderr
    assert "flask chatkit db upgrade" in before.stdout
    assert refused.returncode != 0 and "flask chatkit db upgrade" in refused.stderr
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"from nothing to revision {head}" in upgraded.stdout  # --sql changed nothing
    assert "chatkit_threads" in table_names(fresh_database)
    assert after.returncode == 0 and f"at {head}" in after.stdout
    assert served.returncode == 0 and "0 thread(s)" in served.stdout, served.stderr
    for result in (before, upgraded, after):
        assert "@" not in result.stdout + result.stderr  # no user or password from the URL


# -- a Flask-SQLAlchemy site ---------------------------------------------------------------------


@pytest.fixture
def sqlalchemy_site(
    fresh_database: str, tmp_path: Path
) -> Iterator[Callable[..., tuple[Flask, Any]]]:
    """A site with Flask-SQLAlchemy on the fresh database (and a second bind ``chat``)."""
    pytest.importorskip("flask_sqlalchemy")
    from flask_sqlalchemy import SQLAlchemy

    apps: list[Flask] = []
    fake = FakeResponses(api_key=TEST_API_KEY)
    fake.start()

    def make(**overrides: Any) -> tuple[Flask, Any]:
        app = Flask("site", instance_path=str(tmp_path))
        config = server_config(fake, "", **overrides)
        del config["CHATKIT_STORE_URL"]
        app.config.update(config)
        app.config["SQLALCHEMY_DATABASE_URI"] = fresh_database
        app.config["SQLALCHEMY_BINDS"] = {"chat": fresh_database}
        db = SQLAlchemy(app)

        class User(db.Model):  # type: ignore[name-defined,misc]
            id = db.Column(db.Integer, primary_key=True)

        with app.app_context():
            db.create_all()
        ChatKit(app, store_engine=db)
        apps.append(app)
        return app, db

    yield make
    for app in apps:
        close_app(app)
    fake.stop()


def test_a_flask_sqlalchemy_site_hands_its_database_over_in_one_line(
    sqlalchemy_site: Callable[..., tuple[Flask, Any]], fresh_database: str
) -> None:
    upgrade(fresh_database, "site_chat_")
    app, _db = sqlalchemy_site(CHATKIT_STORE_TABLE_PREFIX="site_chat_", CHATKIT_STORE_BIND="chat")
    events = chat(app.test_client(), "Hello from the site")

    thread_id = events[0]["thread"]["id"]
    engine = sa.create_engine(fresh_database, poolclass=sa.NullPool)
    with engine.connect() as db:  # the site can join its own data to the chat's
        stored = db.execute(sa.text("SELECT id, owner FROM site_chat_threads")).all()
        items = db.scalar(sa.text("SELECT count(*) FROM site_chat_items"))
    engine.dispose()
    assert [row.id for row in stored] == [thread_id]
    assert stored[0].owner.startswith("visitor:")
    assert items == 2  # the visitor's message and the answer
    assert "user" in table_names(fresh_database)


def test_the_site_handoff_refuses_what_it_cannot_use(
    sqlalchemy_site: Callable[..., tuple[Flask, Any]], fresh_database: str
) -> None:
    with pytest.raises(ConfigError) as no_bind:
        sqlalchemy_site(CHATKIT_STORE_BIND="archive")
    assert no_bind.value.key == "CHATKIT_STORE_BIND"
    assert "no bind 'archive'" in str(no_bind.value) and "'chat'" in str(no_bind.value)

    with pytest.raises(ConfigError) as behind:
        sqlalchemy_site()
    assert behind.value.key == "CHATKIT_STORE_URL"
    assert "flask chatkit db upgrade" in str(behind.value)


def test_a_flask_sqlalchemy_site_on_sqlite_gets_the_sql_store_in_its_file(tmp_path: Path) -> None:
    """Its sync ``sqlite:///`` engine becomes ``sqlite+aiosqlite://`` on the same file."""
    pytest.importorskip("flask_sqlalchemy")
    pytest.importorskip("aiosqlite")
    from flask_sqlalchemy import SQLAlchemy

    path = tmp_path / "site.db"
    upgrade(f"sqlite:///{path}")
    with FakeResponses(api_key=TEST_API_KEY) as fake:
        app = Flask("site", instance_path=str(tmp_path))
        app.config.update(server_config(fake, ""))
        del app.config["CHATKIT_STORE_URL"]
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{path}"
        db = SQLAlchemy(app)
        ChatKit(app, store_engine=db)
        try:
            assert app.extensions["chatkit"].server.store.url.drivername == "sqlite+aiosqlite"
            thread_id = chat(app.test_client(), "hello")[0]["thread"]["id"]
        finally:
            close_app(app)

    engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.NullPool)
    with engine.connect() as connection:
        assert connection.scalar(sa.text("SELECT id FROM chatkit_threads")) == thread_id
        assert connection.scalar(sa.text("SELECT count(*) FROM chatkit_items")) == 2
    engine.dispose()
    assert not (tmp_path / "chatkit-threads.db").exists()  # not the embedded store's file


def test_urls_map_to_their_async_drivers_and_a_missing_driver_is_named() -> None:
    from chatkit_flask.server.store import open_store
    from chatkit_flask.server.store_sql import async_url

    assert {
        url: async_url(url).drivername
        for url in ("postgresql://h/db", "postgresql+psycopg2://h/db", "sqlite:///x.db",
                    "mysql+pymysql://h/db", "mariadb://h/db")
    } == {
        "postgresql://h/db": "postgresql+psycopg", "postgresql+psycopg2://h/db":
        "postgresql+psycopg", "sqlite:///x.db": "sqlite+aiosqlite",
        "mysql+pymysql://h/db": "mysql+aiomysql", "mariadb://h/db": "mariadb+aiomysql",
    }  # fmt: skip
    store = open_store("postgresql://chat:pw@h/db", thread_ttl=60)
    assert isinstance(store, SQLStore) and str(store) == "postgresql store"
    assert store.display_url == "postgresql+psycopg://***@h/db"
    try:  # MySQL without aiomysql (a site that installed only the sync driver)
        import aiomysql  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError) as refused:
            open_store("mysql+pymysql://chat:s3cret@h/db", thread_ttl=60)
        assert "needs the driver mysql+aiomysql (aiomysql)" in str(refused.value)
        assert "s3cret" not in str(refused.value)


# -- store specifics -----------------------------------------------------------------------------


def run(store: SQLStore, scenario: Callable[[], Any]) -> Any:
    async def main() -> Any:
        try:
            return await scenario()
        finally:
            await store.aclose()

    return asyncio.run(main())


def test_attachments_are_owner_scoped_adopted_and_purged(sql_tables: str) -> None:
    store = SQLStore(sql_tables, 3600)
    image = ImageAttachment(id="atc_1", name="cat.png", mime_type="image/png",
                            preview_url="https://example.test/p/atc_1")  # fmt: skip
    pdf = FileAttachment(id="atc_2", name="a.pdf", mime_type="application/pdf", thread_id="thr_x")

    async def scenario() -> None:
        await store.save_thread(ThreadMetadata(id="thr_x", created_at=datetime.now()), ALICE)
        await store.save_attachment(image, ALICE)
        await store.save_attachment(pdf, ALICE)
        assert await store.load_attachment("atc_1", ALICE) == image
        assert (await store.load_attachment("atc_2", ALICE)).thread_id == "thr_x"
        with pytest.raises(NotFoundError):
            await store.load_attachment("atc_1", BOB)
        with pytest.raises(NotFoundError):  # Bob cannot take over Alice's id
            await store.save_attachment(image.model_copy(update={"name": "x"}), BOB)
        await store.delete_attachment("atc_1", BOB)  # not his: nothing happens
        assert (await store.load_attachment("atc_1", ALICE)).name == "cat.png"
        await store.delete_attachment("atc_1", ALICE)
        with pytest.raises(NotFoundError):
            await store.load_attachment("atc_1", ALICE)
        await store.move_owner(ALICE.owner, BOB.owner)  # she signed in: her files go with her
        with pytest.raises(NotFoundError):
            await store.load_attachment("atc_2", ALICE)
        assert (await store.load_attachment("atc_2", BOB)).name == "a.pdf"
        await store.purge_owner(BOB.owner)
        with pytest.raises(NotFoundError):
            await store.load_attachment("atc_2", BOB)

    run(store, scenario)


def test_a_statement_that_waits_too_long_fails_within_the_deadline(sql_tables: str) -> None:
    """Another connection holds the thread's row: the write gives up after the statement
    timeout (1 s here) with a store error, and the next write works."""
    store = SQLStore(sql_tables, 3600, timeout=1)
    thread = ThreadMetadata(id="thr_locked", created_at=datetime.now())
    run(store, lambda: store.save_thread(thread, ALICE))
    locker = sa.create_engine(sql_tables, poolclass=sa.NullPool)

    with locker.connect() as db:
        db.execute(sa.text("SELECT 1 FROM chatkit_threads WHERE id = 'thr_locked' FOR UPDATE"))
        started = time.monotonic()
        with pytest.raises(sa.exc.SQLAlchemyError) as failed:
            run(store, lambda: store.delete_thread("thr_locked", ALICE))
        waited = time.monotonic() - started
        db.rollback()
    locker.dispose()

    assert 0.9 < waited < 5, waited
    reason = failed.value.orig  # type: ignore[attr-defined]
    if locker.dialect.name == "postgresql":
        assert "QueryCanceled" in type(reason).__name__
    else:  # MySQL: the lock wait timeout; MariaDB's max_statement_time may come first
        assert reason.args[0] in (1205, 1969), reason
    run(store, lambda: store.delete_thread("thr_locked", ALICE))


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL for this test alone: it is stopped and started in the middle."""
    server = start_postgres_or_skip(PostgresServer())
    upgrade(server.url())
    yield server
    server.stop()


def _items(client: Any, thread_id: str) -> list[str]:
    body = {"type": "items.list", "params": {"thread_id": thread_id, "order": "asc"}}
    listed = client.post(URL, json=body).get_json()
    return [item["content"][0]["text"] for item in listed["data"]]


@pytest.mark.postgres
@pytest.mark.slow
def test_a_postgres_restart_between_messages_costs_one_readable_refusal(
    own_postgres: PostgresServer,
) -> None:
    """The database is down when a message arrives: a JSON 503 that says so (before any
    stream); once it is back the next message works on the same thread."""
    from chatkit_flask.service import create_app

    with FakeResponses(api_key=TEST_API_KEY) as fake:
        app = create_app(
            server_config(fake, own_postgres.url(), CHATKIT_STORE_TIMEOUT=2), environ={}
        )
        try:
            client = app.test_client()
            thread_id = chat(client, "first")[0]["thread"]["id"]
            own_postgres.halt()
            down = client.post(URL, json={
                "type": "threads.add_user_message",
                "params": {"thread_id": thread_id, "input": user_input("while it is down")},
            })  # fmt: skip
            own_postgres.start()
            events = chat(client, "after the restart", thread_id)
            texts = _items(client, thread_id)
        finally:
            close_app(app)

    assert down.status_code == 503, down.get_data(as_text=True)
    assert down.get_json()["error"] == "store_unavailable"
    assert "try again" in down.get_json()["message"].lower()
    assert [e for e in events if e["type"] == "error"] == []
    assert texts == ["first", "You said: first", "after the restart",
                     "You said: after the restart"]  # fmt: skip


@pytest.mark.postgres
@pytest.mark.slow
def test_a_postgres_restart_during_an_answer(own_postgres: PostgresServer) -> None:
    """A restart while the answer streams costs nothing (pool_pre_ping replaces the closed
    connections); a database still down when the answer is saved ends the stream with one
    readable error event; once it is back the next message on the thread works."""
    from chatkit_flask.server.store_guard import NOT_SAVED_MESSAGE
    from chatkit_flask.service import create_app

    long_text = " ".join(["word"] * 25)
    with FakeResponses(api_key=TEST_API_KEY) as fake:
        app = create_app(
            server_config(fake, own_postgres.url(), CHATKIT_STORE_TIMEOUT=2), environ={}
        )
        try:
            client = app.test_client()
            thread_id = chat(client, "first")[0]["thread"]["id"]
            fake.token_delay = 0.2  # a 5 s answer; the database goes away 1.5 s into it
            restarter = threading.Timer(1.5, own_postgres.restart)
            restarter.start()
            restarted = chat(client, long_text, thread_id)
            restarter.join()
            stopper = threading.Timer(1.5, own_postgres.halt)
            stopper.start()
            cut = chat(client, long_text, thread_id)
            stopper.join()
            own_postgres.start()
            fake.token_delay = 0.0
            events = chat(client, "after the restart", thread_id)
            texts = _items(client, thread_id)
        finally:
            close_app(app)

    assert [e for e in restarted if e["type"] == "error"] == []
    errors = [e for e in cut if e["type"] == "error"]
    assert [e["message"] for e in errors] == [NOT_SAVED_MESSAGE], cut[-3:]
    assert [e for e in events if e["type"] == "error"] == []
    assert texts[:4] == ["first", "You said: first", long_text, f"You said: {long_text}"]
    assert texts[-2:] == ["after the restart", "You said: after the restart"]


# -- health: start-up, /readyz, flask chatkit check ----------------------------------------------


def _start_error(url: str) -> str:
    from chatkit_flask.service import create_app

    with FakeResponses(api_key=TEST_API_KEY) as fake, pytest.raises(ConfigError) as refused:
        create_app(server_config(fake, url, CHATKIT_STORE_TIMEOUT=2), environ={})
    assert refused.value.key == "CHATKIT_STORE_URL"
    return str(refused.value)


@pytest.mark.postgres
def test_start_up_names_a_database_it_cannot_reach_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    from chatkit_flask.testing.redis_server import free_port

    nobody = _start_error(f"postgresql+psycopg://chat:s3cret-pw@127.0.0.1:{free_port()}/chat")
    stranger = _start_error(
        f"postgresql+psycopg://stranger:s3cret-pw@127.0.0.1:{postgres_server.port}/chatkit"
    )

    assert "the postgresql store cannot be used: OperationalError" in nobody
    assert "Connection refused" in nobody or "connection failed" in nobody
    assert 'role "stranger" does not exist' in stranger
    assert "s3cret-pw" not in nobody + stranger


@pytest.mark.mysql
def test_start_up_names_a_mysql_database_it_cannot_reach_without_the_password(
    mysql_server: MariaDBServer,
) -> None:
    from chatkit_flask.testing.redis_server import free_port

    nobody = _start_error(f"mysql+pymysql://chat:s3cret-pw@127.0.0.1:{free_port()}/chat")
    wrong = _start_error(f"mysql+pymysql://chatkit:s3cret-pw@127.0.0.1:{mysql_server.port}/chatkit")

    assert "the mysql store cannot be used: OperationalError" in nobody
    assert "Can't connect to MySQL server on '127.0.0.1'" in nobody
    assert "Access denied for user 'chatkit'@'127.0.0.1'" in wrong
    assert "s3cret-pw" not in nobody + wrong


@pytest.fixture
def own_mysql() -> Iterator[MariaDBServer]:
    """A MariaDB for this test alone: it is stopped and started in the middle."""
    pytest.importorskip("aiomysql")
    server = start_mysql_or_skip(MariaDBServer())
    upgrade(server.url())
    yield server
    server.stop()


@pytest.mark.mysql
def test_readyz_and_check_on_mariadb(own_mysql: MariaDBServer) -> None:
    """A conversation, then the database goes away and comes back: /readyz and
    ``flask chatkit check`` say so each time, and the thread is still there."""
    from chatkit_flask.service import create_app

    with FakeResponses(api_key=TEST_API_KEY) as fake:
        app = create_app(server_config(fake, own_mysql.url(), CHATKIT_STORE_TIMEOUT=2),
                         environ={})  # fmt: skip
        try:
            client = app.test_client()
            thread_id = chat(client, "first")[0]["thread"]["id"]
            ready = client.get("/readyz")
            checked = app.test_cli_runner().invoke(args=["chatkit", "check"])
            own_mysql.halt()
            stopped = client.get("/readyz")
            stopped_check = app.test_cli_runner().invoke(args=["chatkit", "check"])
            own_mysql.start()
            back = client.get("/readyz")
            chat(client, "after the restart", thread_id)
            texts = _items(client, thread_id)
        finally:
            close_app(app)

    assert ready.get_json() == {"status": "ready", "storage": "ok", "store": "ok"}
    assert checked.exit_code == 0, checked.output
    assert "ok    the mysql store wrote, read back and deleted a probe thread" in checked.output
    assert "mysql+pymysql://chatkit:***@127.0.0.1" in checked.output  # the password masked
    assert f"ok    its tables chatkit_* are at revision {head_revision()}" in checked.output
    assert stopped.status_code == 503
    assert stopped.get_json()["store"] == "unreachable"
    assert stopped_check.exit_code == 3, stopped_check.output
    assert "FAIL  the mysql store cannot be used: OperationalError" in stopped_check.output
    assert back.status_code == 200
    assert texts == ["first", "You said: first", "after the restart",
                     "You said: after the restart"]  # fmt: skip
    assert "chatkit-test-password" not in checked.output + stopped_check.output


def test_an_upsert_never_overwrites_another_owners_row(sql_tables: str) -> None:
    """The insert-or-update behind save_thread and save_attachment leaves a row of another
    owner as it is (the race its caller's check can lose): MySQL has no WHERE there."""
    store = SQLStore(sql_tables, 3600)
    t = store.tables.threads
    row = {"id": "thr_race", "created_us": 1, "updated_at": 2.0, "data": "{}"}

    async def scenario() -> Any:
        async with store._connect() as db, db.begin():
            await store._upsert(db, t, {**row, "owner": ALICE.owner}, keys=("id",), owned=True)
            await store._upsert(
                db, t, {**row, "owner": BOB.owner, "updated_at": 9.0, "data": '{"bob":1}'},
                keys=("id",), owned=True,
            )  # fmt: skip
            await store._upsert(
                db, t, {**row, "owner": ALICE.owner, "data": '{"v":2}'}, keys=("id",), owned=True
            )
            return (await db.execute(sa.select(t.c.owner, t.c.updated_at, t.c.data))).all()

    assert [tuple(r) for r in run(store, scenario)] == [(ALICE.owner, 2.0, '{"v":2}')]


@pytest.mark.postgres
def test_readyz_and_check_on_postgresql(own_postgres: PostgresServer, tmp_path: Path) -> None:
    from chatkit_flask.service import create_app

    with FakeResponses(api_key=TEST_API_KEY) as fake:
        app = create_app(server_config(fake, own_postgres.url(), CHATKIT_STORE_TIMEOUT=2),
                         environ={})  # fmt: skip
        try:
            client = app.test_client()
            ready = client.get("/readyz")
            checked = app.test_cli_runner().invoke(args=["chatkit", "check"])
            own_postgres.halt()
            stopped = client.get("/readyz")
            stopped_check = app.test_cli_runner().invoke(args=["chatkit", "check"])
            own_postgres.start()
            back = client.get("/readyz")
        finally:
            close_app(app)

    assert ready.get_json() == {"status": "ready", "storage": "ok", "store": "ok"}
    assert checked.exit_code == 0, checked.output
    assert "ok    the postgresql store wrote, read back and deleted a probe thread" in (
        checked.output
    )
    assert "postgresql+psycopg://***@127.0.0.1" in checked.output
    assert f"ok    its tables chatkit_* are at revision {head_revision()}" in checked.output
    assert stopped.status_code == 503
    assert stopped.get_json()["failing"] == ["store"]
    assert stopped.get_json()["store"] == "unreachable"
    assert stopped_check.exit_code == 3, stopped_check.output
    assert "FAIL  the postgresql store cannot be used: OperationalError" in stopped_check.output
    assert back.status_code == 200


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_under_gunicorn_a_postgres_restart_costs_no_request(
    own_postgres: PostgresServer, tmp_path: Path, real_redis: Any
) -> None:
    """The shipped config (3 workers, each with its pool): after a restart between requests,
    pool_pre_ping replaces every closed connection and no request fails."""
    from tests.test_server_gunicorn import MODEL_KEY, Service

    listing = {"type": "threads.list", "params": {}}
    with FakeResponses(api_key=MODEL_KEY) as fake:
        service = Service(tmp_path, fake, own_postgres.url())
        try:
            create = {"type": "threads.create", "params": {"input": user_input("hi")}}
            created = service.post(create)
            cookie = created.cookies["chatkit_session_id"]
            tabs = service.tabs(6)  # keep-alive connections on at least two workers
            warm = [service.post(listing, cookie, tabs[i % 6]).status_code for i in range(30)]
            own_postgres.restart()
            after = [service.post(listing, cookie, tabs[i % 6]) for i in range(60)]
            log = service.log_path.read_text()
        finally:
            service.stop()

    assert warm == [200] * 30
    assert [r.status_code for r in after] == [200] * 60
    assert all(len(r.json()["data"]) == 1 for r in after)
    assert len(service.workers_of([r.headers["X-Request-ID"] for r in after])) >= 2
    assert "thread store failed" not in log
