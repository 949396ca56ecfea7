"""Health signals that tell the truth (server mode's thread store).

- Start-up refuses a store it cannot open and write, naming ``CHATKIT_STORE_URL`` and the cause
  (through ``create_app``; the gunicorn runs are in tests/test_health_gunicorn.py).
- ``/readyz`` probes the store in use and the limiter storage: 503 naming the failing part.
- The store failing mid-reply (Redis stopped, SQLite locked past its busy timeout) ends the
  stream with a readable ``error`` event, one log line naming the store, and a metric.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

pytest.importorskip("chatkit")

from flask import Flask
from prometheus_client import REGISTRY

from chatkit_flask.cli import EXIT_MISCONFIGURED, EXIT_OK, EXIT_UNREACHABLE
from chatkit_flask.server import store_sqlite
from chatkit_flask.server.store import StoreUnusable, open_store
from chatkit_flask.server.store_guard import NOT_SAVED_MESSAGE
from chatkit_flask.service import create_app
from chatkit_flask.settings import ConfigError
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from chatkit_flask.testing.redis_server import RedisServer, free_port
from tests.conftest import TEST_API_KEY
from tests.server_support import sse_events
from tests.services import start_redis_or_skip
from tests.test_server_mode import close_app, create_body, server_config

URL = "/api/chatkit"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=TEST_API_KEY) as server:
        yield server


@pytest.fixture
def make_app(fake: FakeResponses) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []
    fake.clear()

    def factory(store_url: str, **overrides: Any) -> Flask:
        app = create_app(server_config(fake, store_url, **overrides), environ={})
        apps.append(app)
        return app

    yield factory
    for app in apps:
        # A reply the store cut short leaves the SDK's answer generator to be closed by the
        # loop: let it run before the loop stops.
        app.extensions["chatkit"].server.bridge.run(lambda: asyncio.sleep(0.2), 5)
        close_app(app)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private redis-server this test may stop (never the suite's)."""
    server = start_redis_or_skip(RedisServer())
    yield server
    server.stop()


def start_error(fake: FakeResponses, store_url: str) -> str:
    with pytest.raises(ConfigError) as caught:
        create_app(server_config(fake, store_url), environ={})
    assert caught.value.key == "CHATKIT_STORE_URL"
    return str(caught.value)


# ----------------------------------------------------------------------------- start-up


def test_a_directory_that_does_not_exist_stops_start_up(
    fake: FakeResponses, tmp_path: Path
) -> None:
    message = start_error(fake, f"sqlite:///{tmp_path}/missing/threads.db")
    assert message.startswith("CHATKIT_STORE_URL: ")
    assert f"the directory {tmp_path}/missing does not exist" in message


def test_a_file_where_a_directory_should_be_is_not_called_missing(
    fake: FakeResponses, tmp_path: Path
) -> None:
    (tmp_path / "plain-file").write_text("not a directory")
    message = start_error(fake, f"sqlite:///{tmp_path}/plain-file/threads.db")
    assert f"{tmp_path}/plain-file is not a directory" in message
    assert "does not exist" not in message
    assert "is not a directory" in start_error(fake, "sqlite:////etc/passwd/x.db")


def test_a_directory_without_ordinary_files_stops_start_up(fake: FakeResponses) -> None:
    # /proc exists and even looks writable to root; no database file can be made there.
    message = start_error(fake, "sqlite:////proc/chatkit-threads.db")
    assert "cannot create chatkit-threads.db in /proc" in message


def test_a_directory_the_file_system_refuses_is_permission_denied(fake: FakeResponses) -> None:
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs")
    assert "permission denied: /sys/kernel/threads.db" in start_error(
        fake, "sqlite:////sys/kernel/threads.db"
    )


def test_a_directory_in_place_of_the_file_stops_start_up(
    fake: FakeResponses, tmp_path: Path
) -> None:
    (tmp_path / "threads.db").mkdir()
    assert f"{tmp_path}/threads.db is a directory" in start_error(
        fake, f"sqlite:///{tmp_path}/threads.db"
    )


def test_a_file_that_is_not_a_database_stops_start_up(fake: FakeResponses, tmp_path: Path) -> None:
    (tmp_path / "threads.db").write_bytes(b"this is not a database file " * 100)
    message = start_error(fake, f"sqlite:///{tmp_path}/threads.db")
    assert "not a SQLite database" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_directory_of_another_user_is_permission_denied() -> None:
    """As the unprivileged user a service runs as (root is let in anywhere): a forked child
    drops to nobody and runs the start-up probe."""
    top = Path(tempfile.mkdtemp(prefix="chatkit-health-"))  # pytest's tmp_path is root-only
    os.chmod(top, 0o755)
    data, private = top / "data", top / "private"
    data.mkdir(mode=0o755)  # root's: others may read, not write
    private.mkdir(mode=0o700)
    try:
        assert probe_as_nobody(f"sqlite:///{data}/threads.db") == f"permission denied: {data}"
        assert probe_as_nobody(f"sqlite:///{private}/sub/threads.db") == (
            f"permission denied: {private} may not be entered"
        )
    finally:
        shutil.rmtree(top)


def probe_as_nobody(url: str) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        message = "no error"
        try:
            os.setgid(65534)
            os.setuid(65534)
            runtime_store = open_store(url, thread_ttl=60)
            asyncio.run(runtime_store.probe(write=True))
        except (ConfigError, StoreUnusable) as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"unexpected {exc!r}"
        finally:
            os.write(write_end, message.encode())
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode().removeprefix("CHATKIT_STORE_URL: ")


def test_a_redis_nobody_runs_stops_start_up(fake: FakeResponses) -> None:
    message = start_error(fake, f"redis://:hunter2-store-pass@127.0.0.1:{free_port()}/0")
    assert "the redis store cannot be used: cannot connect to Redis" in message
    assert "hunter2" not in message


def test_a_read_only_redis_stops_start_up(fake: FakeResponses, own_redis: RedisServer) -> None:
    own_redis.client().config_set("min-replicas-to-write", 1)  # refuses writes, like a replica
    message = start_error(fake, own_redis.url())
    assert "the redis store cannot be used: Redis answered an error (NOREPLICAS)" in message


def test_a_working_store_starts(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    app = make_app(f"sqlite:///{tmp_path}/threads.db")
    assert (tmp_path / "threads.db").is_file()
    with sqlite3.connect(tmp_path / "threads.db") as db:  # the probe row did not stay
        assert db.execute("SELECT COUNT(*) FROM chatkit_threads").fetchone() == (0,)
    assert app.test_client().get("/readyz").status_code == 200


# ------------------------------------------------------------------------------ /readyz


def test_readyz_names_a_sqlite_store_that_went_away(
    make_app: Callable[..., Flask], tmp_path: Path, mint_logs: pytest.LogCaptureFixture
) -> None:
    caplog = mint_logs
    path = tmp_path / "threads.db"
    client = make_app(f"sqlite:///{path}").test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json() == {"status": "ready", "storage": "ok", "store": "ok"}

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "not_ready", "storage": "ok", "store": "not_writable", "failing": ["store"],
    }  # fmt: skip
    assert f"the sqlite store cannot be used: {path} no longer exists" in caplog.text
    spec = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())["paths"]["/readyz"]
    for status, body in (("200", ready.get_json()), ("503", response.get_json())):
        schema = spec["get"]["responses"][status]["content"]["application/json"]["schema"]
        jsonschema.validate(body, schema)


def test_readyz_names_a_locked_sqlite_store_within_its_deadline(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    path = tmp_path / "threads.db"
    client = make_app(f"sqlite:///{path}").test_client()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        response = client.get("/readyz")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert response.status_code == 503
    assert response.get_json()["store"] == "locked"
    assert client.get("/readyz").status_code == 200


def test_readyz_names_a_redis_store_that_stopped(
    make_app: Callable[..., Flask], own_redis: RedisServer
) -> None:
    client = make_app(own_redis.url()).test_client()
    assert client.get("/readyz").get_json()["store"] == "ok"
    own_redis.kill()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["failing"] == ["store"]
    assert response.get_json()["store"] in {"unreachable", "timeout"}


def test_readyz_answers_within_its_deadline_when_redis_hangs(
    make_app: Callable[..., Flask], own_redis: RedisServer
) -> None:
    import time

    client = make_app(own_redis.url()).test_client()
    own_redis.pause()
    started = time.monotonic()
    response = client.get("/readyz")
    elapsed = time.monotonic() - started
    own_redis.resume()
    assert response.status_code == 503 and response.get_json()["store"] == "timeout"
    assert elapsed < 3.5


def test_readyz_names_the_limiter_storage_apart_from_the_store(
    make_app: Callable[..., Flask], tmp_path: Path, own_redis: RedisServer
) -> None:
    app = make_app(
        f"sqlite:///{tmp_path}/threads.db",
        RATELIMIT_STORAGE_URI=own_redis.url(),
        RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=True,
    )
    own_redis.kill()
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["failing"] == ["storage"] and body["store"] == "ok"


# ----------------------------------------------------------------------- mid-reply failure


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def read_until_text(frames: Iterator[bytes]) -> list[bytes]:
    """Frames up to the first text delta from the model (the visitor's message is stored)."""
    seen = []
    for frame in frames:
        seen.append(frame)
        if b"assistant_message.content_part.text_delta" in frame:
            return seen
    raise AssertionError(f"no text delta in {seen!r}")


def reply_with_store_cut(
    app: Flask, fake: FakeResponses, cut: Callable[[], None]
) -> tuple[list[dict[str, Any]], Any]:
    """Start a reply, ``cut`` the store while the model is still talking, read to the end."""
    fake.enqueue(Reply(text="one two three four five six seven eight", token_delay=0.1))
    response = app.test_client().post(
        URL, data=json.dumps(create_body("the secret words of the visitor")),
        content_type="application/json", buffered=False,
    )  # fmt: skip
    assert response.status_code == 200
    frames = iter(response.response)
    body = b"".join(read_until_text(frames))
    cut()
    body += b"".join(frames)
    response.close()
    return sse_events(body), response


def assert_store_failure_reported(
    events: list[dict[str, Any]],
    logs: pytest.LogCaptureFixture,
    kind: str,
    before: dict[str, float],
) -> None:
    # Saving the answer failed: the visitor is told so, and to send again (issue 24 item 2).
    assert events[-1] == {
        "type": "error", "code": "custom", "message": NOT_SAVED_MESSAGE, "allow_retry": True,
    }  # fmt: skip
    assert [e["type"] for e in events].count("error") == 1
    lines = [r.getMessage() for r in logs.records if "thread store failed" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f": {kind} in add_thread_item: " in lines[0]
    everything = "\n".join(r.getMessage() for r in logs.records)
    assert "secret words" not in everything
    # Our lines carry no traceback (a client another test left unclosed may log its own).
    ours = [r for r in logs.records if r.name.startswith("chatkit_flask")]
    assert not [r for r in ours if r.exc_info or "Traceback" in r.getMessage()]
    message_lines = [r.getMessage() for r in logs.records if r.name == "chatkit_flask.message"]
    assert "outcome=failed" in message_lines[-1] and "cause=store" in message_lines[-1]
    assert metric("chatkit_store_errors_total") == before["errors"] + 1
    assert metric("chatkit_messages_total", outcome="failed") == before["failed"] + 1


def counters() -> dict[str, float]:
    return {
        "errors": metric("chatkit_store_errors_total"),
        "failed": metric("chatkit_messages_total", outcome="failed"),
    }


def test_redis_stopped_mid_reply_ends_the_stream_with_an_error_event(
    make_app: Callable[..., Flask],
    fake: FakeResponses,
    own_redis: RedisServer,
    mint_logs: pytest.LogCaptureFixture,
) -> None:
    app = make_app(own_redis.url())
    before = counters()
    events, _ = reply_with_store_cut(app, fake, own_redis.kill)
    assert "thread.item.updated" in [e["type"] for e in events]  # the answer had begun
    assert_store_failure_reported(events, mint_logs, "redis", before)


def test_sqlite_locked_mid_reply_ends_the_stream_with_an_error_event(
    make_app: Callable[..., Flask],
    fake: FakeResponses,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mint_logs: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(store_sqlite, "BUSY_TIMEOUT_MS", 300)  # not 10 s of waiting in a test
    path = tmp_path / "threads.db"
    app = make_app(f"sqlite:///{path}")
    holder = sqlite3.connect(path, isolation_level=None)
    before = counters()

    def lock() -> None:
        holder.execute("BEGIN IMMEDIATE")  # held past the busy timeout

    try:
        events, _ = reply_with_store_cut(app, fake, lock)
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
    assert_store_failure_reported(events, mint_logs, "sqlite", before)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_thread_that_vanishes_mid_reply_is_a_failure_to_save(
    make_app: Callable[..., Flask],
    fake: FakeResponses,
    tmp_path: Path,
    kind: str,
    mint_logs: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    """Issue 24 item 2: the store loses the thread while the answer streams (Redis data lost, a
    row deleted): not a silent "cancelled" and an uncounted not-found, but a failure."""
    if kind == "redis":
        own = request.getfixturevalue("own_redis")
        app = make_app(own.url())
        lose = own.client().flushdb
    else:
        path = tmp_path / "threads.db"
        app = make_app(f"sqlite:///{path}")

        def lose() -> None:
            with sqlite3.connect(path) as db:
                db.execute("DELETE FROM chatkit_threads")

    before = counters()
    events, _ = reply_with_store_cut(app, fake, lose)
    assert_store_failure_reported(events, mint_logs, kind, before)
    line = [r.getMessage() for r in mint_logs.records if "thread store failed" in r.getMessage()]
    assert "thread vanished" in line[0]


def test_a_sqlite_file_moved_away_is_refused_and_served_again_when_it_is_back(
    make_app: Callable[..., Flask], tmp_path: Path, mint_logs: pytest.LogCaptureFixture
) -> None:
    """Issue 24 item 5: never served from two files (the old one through open connections, a
    new empty one through new connections); reported; healed without a restart."""
    path = tmp_path / "threads.db"
    app = make_app(f"sqlite:///{path}")
    client = app.test_client()
    created = client.post(URL, json=create_body("hello"))
    thread_id = sse_events(created.data)[0]["thread"]["id"]
    listing = {"type": "threads.list", "params": {}}

    path.rename(tmp_path / "moved.db")
    while_moved = [client.post(URL, json=listing).status_code for _ in range(10)]
    ready_while_moved = client.get("/readyz")
    (tmp_path / "moved.db").rename(path)
    after = client.post(URL, json=listing)

    assert while_moved == [503] * 10
    assert not path.exists() or path.stat().st_size > 0  # no new empty file was made meanwhile
    assert ready_while_moved.status_code == 503
    assert ready_while_moved.get_json()["failing"] == ["store"]
    assert any("was deleted while the server ran" in r.getMessage() for r in mint_logs.records)
    assert after.status_code == 200
    assert [t["id"] for t in after.get_json()["data"]] == [thread_id]


def test_a_replaced_sqlite_file_is_never_served(
    make_app: Callable[..., Flask], tmp_path: Path, mint_logs: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "threads.db"
    app = make_app(f"sqlite:///{path}")
    client = app.test_client()
    client.post(URL, json=create_body("hello"))
    copy = tmp_path / "copy.db"
    with sqlite3.connect(path) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    os.replace(copy, path)  # e.g. a backup restored over the live file

    answer = client.post(URL, json={"type": "threads.list", "params": {}})

    assert answer.status_code == 503
    assert client.get("/readyz").status_code == 503
    assert any("was replaced while the server ran" in r.getMessage() for r in mint_logs.records)


# ------------------------------------------------------------------ flask chatkit check


def check(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=["chatkit", "check", *args])


@pytest.fixture
def known_models(fake: FakeResponses) -> Iterator[FakeResponses]:
    fake.models = frozenset({"gpt-test"})
    yield fake
    fake.models = None


def test_check_live_in_server_mode_checks_store_and_model(
    make_app: Callable[..., Flask], known_models: FakeResponses, tmp_path: Path
) -> None:
    result = check(make_app(f"sqlite:///{tmp_path}/threads.db"), "--live")
    assert result.exit_code == EXIT_OK, result.output
    assert "ok    the sqlite store wrote, read back and deleted a probe thread in" in result.output
    assert re.search(r"ok    model gpt-test answered in \d+ ms", result.output), result.output
    assert "All checks passed." in result.output
    assert TEST_API_KEY not in result.output
    [request] = known_models.requests
    assert request.json["model"] == "gpt-test" and request.json["max_output_tokens"] == 16
    assert not request.json.get("stream")
    with sqlite3.connect(tmp_path / "threads.db") as db:  # the probe thread is gone
        assert db.execute("SELECT COUNT(*) FROM chatkit_threads").fetchone() == (0,)


def test_check_without_live_leaves_the_model_alone(
    make_app: Callable[..., Flask], fake: FakeResponses, own_redis: RedisServer
) -> None:
    result = check(make_app(own_redis.url()))
    assert result.exit_code == EXIT_OK, result.output
    assert "ok    the redis store wrote, read back and deleted a probe thread" in result.output
    assert "Model: not contacted (add --live" in result.output
    assert fake.count == 0
    assert own_redis.client().dbsize() == 0  # nothing of the probe left behind


def test_check_live_names_a_refused_key(
    make_app: Callable[..., Flask], fake: FakeResponses, tmp_path: Path
) -> None:
    wrong = "wrong-model-key-0000000000000000"
    app = make_app(f"sqlite:///{tmp_path}/threads.db", OPENAI_API_KEY=wrong)
    result = check(app, "--live")
    assert result.exit_code == EXIT_MISCONFIGURED, result.output
    assert "FAIL  key refused: the provider answered 401 (OPENAI_API_KEY)" in result.output
    assert wrong not in result.output


def test_check_live_names_a_model_that_does_not_exist(
    make_app: Callable[..., Flask], known_models: FakeResponses, tmp_path: Path
) -> None:
    app = make_app(f"sqlite:///{tmp_path}/threads.db", CHATKIT_AGENT_MODEL="gpt-nope")
    result = check(app, "--live")
    assert result.exit_code == EXIT_MISCONFIGURED, result.output
    assert "FAIL  model not found: gpt-nope (CHATKIT_AGENT_MODEL" in result.output


def test_check_live_names_a_model_nobody_serves(
    make_app: Callable[..., Flask], fake: FakeResponses, tmp_path: Path
) -> None:
    port = free_port()
    app = make_app(
        f"sqlite:///{tmp_path}/threads.db", OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1"
    )
    result = check(app, "--live")
    assert result.exit_code == EXIT_UNREACHABLE, result.output
    assert f"FAIL  cannot reach the model at 127.0.0.1:{port} (OPENAI_BASE_URL)" in result.output


def test_check_names_a_store_that_stopped(
    make_app: Callable[..., Flask], fake: FakeResponses, own_redis: RedisServer
) -> None:
    app = make_app(own_redis.url())
    own_redis.kill()
    result = check(app, "--live")
    assert result.exit_code == EXIT_UNREACHABLE, result.output
    assert "FAIL  the redis store cannot be used: cannot connect to Redis" in result.output
    assert "(CHATKIT_STORE_URL)" in result.output
    assert "ok    model gpt-test answered" in result.output  # the other checks still ran


def test_misconfigured_wins_over_unreachable(
    make_app: Callable[..., Flask], known_models: FakeResponses, own_redis: RedisServer
) -> None:
    app = make_app(own_redis.url(), CHATKIT_AGENT_MODEL="gpt-nope")
    own_redis.kill()
    assert check(app, "--live").exit_code == EXIT_MISCONFIGURED


def test_a_store_failure_between_the_sdks_steps_is_an_error_event_not_a_cut_stream(
    make_app: Callable[..., Flask],
    fake: FakeResponses,
    tmp_path: Path,
    mint_logs: pytest.LogCaptureFixture,
) -> None:
    """threads.create: the thread is saved and announced, then saving the visitor's message
    fails (the SDK does that outside its own error handling)."""
    app = make_app(f"sqlite:///{tmp_path}/threads.db")
    store = app.extensions["chatkit"].server.store  # the runtime's own, under guard and counter

    async def disk_full(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    store.add_thread_item = disk_full
    before = counters()
    response = app.test_client().post(
        URL, data=json.dumps(create_body("hello")), content_type="application/json",
        buffered=True,
    )  # fmt: skip
    assert response.status_code == 200
    events = sse_events(response.data)
    assert [e["type"] for e in events] == ["thread.created", "error"]
    assert events[-1]["message"] == NOT_SAVED_MESSAGE
    assert fake.count == 0  # the model was never called
    lines = [r.getMessage() for r in mint_logs.records if "thread store failed" in r.getMessage()]
    assert lines == [lines[0]] and ": sqlite in add_thread_item: OperationalError" in lines[0]
    assert "(database or disk is full)" in lines[0]  # the driver's words (issue 24 item 5)
    assert metric("chatkit_store_errors_total") == before["errors"] + 1
    assert metric("chatkit_messages_total", outcome="failed") == before["failed"] + 1


def test_check_never_shows_the_store_password(
    make_app: Callable[..., Flask], fake: FakeResponses, own_redis: RedisServer
) -> None:
    own_redis.client().config_set("requirepass", "hunter2-store-pass")
    url = f"redis://:hunter2-store-pass@127.0.0.1:{own_redis.port}/0"
    result = check(make_app(url))
    assert result.exit_code == EXIT_OK, result.output
    assert "hunter2" not in result.output
    assert f"threads live at redis://:***@127.0.0.1:{own_redis.port}/0" in result.output
