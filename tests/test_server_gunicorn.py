"""Server mode under gunicorn as shipped (config/gunicorn.conf.py, 3 gthread workers): one
conversation across workers, 50 concurrent conversations, exact message limits across workers,
a visitor hanging up (the model request aborted, the partial answer kept) and a stream that
outlives the worker timeout. The store is the real Redis or a shared SQLite file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from chatkit_flask.testing.fake_responses import FakeResponses
from tests.conftest import REDIS_URL, TEST_SECRET_KEY
from tests.server_support import sse_events as events
from tests.server_support import user_input

ROOT = Path(__file__).resolve().parent.parent
MODEL_KEY = "test-model-key-not-a-real-one"
URL = "/api/chatkit"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gunicorn(
    args: list[str], env: dict[str, str], log_path: Path, base: str
) -> subprocess.Popen[bytes]:
    """``gunicorn -c config/gunicorn.conf.py [args] wsgi:app`` from the checkout, stdout and
    stderr into ``log_path``; returns once ``base``/healthz answers (RuntimeError with the log
    if it exits or does not answer within 40 s)."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", *args, "wsgi:app"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(log_path.read_text())
        try:
            if requests.get(base + "/healthz", timeout=1).status_code == 200:
                return process
        except requests.RequestException:
            time.sleep(0.1)
    process.terminate()
    process.wait(20)
    raise RuntimeError("gunicorn did not start:\n" + log_path.read_text())


class Service:
    """``gunicorn -c config/gunicorn.conf.py wsgi:app`` in server mode; the access log names the
    worker pid of every request id."""

    def __init__(self, tmp: Path, fake: FakeResponses, store_url: str, **extra: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "gunicorn.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "GUNICORN_"))}
        env.pop("RATELIMIT_STORAGE_URI", None)
        env.update(
            CHATKIT_BACKEND="server",
            OPENAI_API_KEY=MODEL_KEY,
            OPENAI_BASE_URL=fake.base_url,
            OPENAI_AGENTS_DISABLE_TRACING="1",
            SECRET_KEY=TEST_SECRET_KEY,
            CHATKIT_STORE_URL=store_url,
            CHATKIT_COOKIE_SECURE="false",
            CHATKIT_RATELIMIT_PER_USER="1000 per minute",
            CHATKIT_RATELIMIT_PER_IP="10000 per minute",
            CHATKIT_RATELIMIT_REQUESTS_PER_IP="10000 per minute",
            CHATKIT_MAX_STREAMS_PER_USER="50",
            CHATKIT_MAX_STREAMS_PER_IP="1000",
            CHATKIT_MAX_STREAMS_PER_WORKER="1000",
            CHATKIT_TITLE_MODEL="off",  # one model call per message (the fake counts them)
            RATELIMIT_STORAGE_URI=REDIS_URL,
            GUNICORN_BIND=f"127.0.0.1:{self.port}",
            GUNICORN_WORKERS="3",
            GUNICORN_THREADS="32",
        )
        env.update(extra)
        self.process = start_gunicorn(
            ["--access-logformat", "%(p)s %({x-request-id}o)s"], env, self.log_path, self.base
        )

    def post(
        self,
        body: dict[str, Any],
        cookie: str | None = None,
        session: requests.Session | None = None,
    ) -> requests.Response:
        """One request on its own connection (so gunicorn may hand it to any worker), or on
        ``session``'s keep-alive connection."""
        with contextlib.nullcontext(session) if session else requests.Session() as client:
            return client.post(
                self.base + URL,
                json=body,
                cookies={"chatkit_session_id": cookie} if cookie else None,
                timeout=60,
            )

    def tabs(self, count: int) -> list[requests.Session]:
        """``count`` keep-alive connections opened at once, as browser tabs opening together:
        the workers share such a burst (tests/test_asgi_worker_accept.py), and each connection
        then stays on its worker."""
        deadline = time.monotonic() + 30
        while True:  # until both workers are up and hold some (the second may still load)
            sessions = [requests.Session() for _ in range(count)]
            with ThreadPoolExecutor(count) as pool:
                answers = list(pool.map(
                    lambda s: self.post({"type": "threads.list", "params": {}}, session=s),
                    sessions,
                ))  # fmt: skip
            time.sleep(0.2)  # the access lines are written
            if len(self.workers_of([a.headers["X-Request-ID"] for a in answers])) >= 2:
                for session in sessions:
                    session.cookies.clear()  # the tabs' own visitor cookies: the caller's count
                return sessions
            for session in sessions:
                session.close()
            assert time.monotonic() < deadline, "a burst of connections stayed on one worker"
            time.sleep(0.5)

    def workers_of(self, request_ids: list[str]) -> set[str]:
        pids = {}
        for line in self.log_path.read_text().splitlines():
            match = re.fullmatch(r"<(\d+)> ([0-9a-f]{32})", line.strip())
            if match:
                pids[match.group(2)] = match.group(1)
        return {pids[rid] for rid in request_ids if rid in pids}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tracebacks(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if "Traceback" in line]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=MODEL_KEY) as server:
        yield server


@pytest.fixture(params=["redis", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def service(
    request: pytest.FixtureRequest, real_redis: Any, fake: FakeResponses, tmp_path: Path
) -> Iterator[Service]:
    fake.clear()
    store = (
        REDIS_URL.rsplit("/", 1)[0] + "/" + str(int(REDIS_URL.rsplit("/", 1)[1]) ^ 1)
        if request.param == "redis"
        else request.getfixturevalue("postgres_tables")
        if request.param == "postgres"
        else f"sqlite:///{tmp_path}/threads.db"
    )
    if request.param == "redis":
        import redis

        redis.Redis.from_url(store).flushdb()
    svc = Service(tmp_path, fake, store)
    yield svc
    svc.stop()
    assert not svc.tracebacks(), svc.log_path.read_text()[-3000:]


def test_one_conversation_across_workers(service: Service, fake: FakeResponses) -> None:
    first = service.post({"type": "threads.create", "params": {"input": user_input("one")}})
    assert first.status_code == 200, first.text
    cookie = first.cookies["chatkit_session_id"]
    thread = events(first.content)[0]["thread"]["id"]
    request_ids = [first.headers["X-Request-ID"]]
    tabs = service.tabs(8)  # the conversation goes round them: both workers hold some
    for n in range(8):
        reply = service.post(
            {"type": "threads.add_user_message",
             "params": {"thread_id": thread, "input": user_input(f"message {n}")}},
            cookie, tabs[n],
        )  # fmt: skip
        assert reply.status_code == 200
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        done = [e for e in events(reply.content) if e["type"] == "thread.item.done"]
        assert done[-1]["item"]["content"][0]["text"] == f"You said: message {n}"
        request_ids.append(reply.headers["X-Request-ID"])
        listed = service.post(
            {"type": "items.list", "params": {"thread_id": thread, "limit": 100}},
            cookie, tabs[(n + 1) % len(tabs)],
        )  # fmt: skip
        assert listed.status_code == 200
        request_ids.append(listed.headers["X-Request-ID"])
    page = service.post(
        {"type": "items.list", "params": {"thread_id": thread, "limit": 100}}, cookie
    )
    assert len(page.json()["data"]) == 18  # 9 questions, 9 answers, whichever worker stored them
    # The model saw the history each time: the last request holds the earlier messages.
    assert "message 3" in json.dumps(fake.requests[-1].json["input"])
    assert len(service.workers_of(request_ids)) >= 2, "every request hit one worker"
    # Another visitor, on any worker, cannot read it.
    stranger = service.post({"type": "items.list", "params": {"thread_id": thread}})
    assert stranger.status_code == 404


def test_fifty_concurrent_conversations(service: Service, fake: FakeResponses) -> None:
    fake.token_delay = 0.02
    try:

        def converse(n: int) -> tuple[int, str]:
            created = service.post(
                {"type": "threads.create", "params": {"input": user_input(f"hi from {n}")}}
            )
            answer = [e for e in events(created.content) if e["type"] == "thread.item.done"][-1]
            return created.status_code, answer["item"]["content"][0]["text"]

        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(converse, range(50)))
    finally:
        fake.token_delay = 0.0
    assert [status for status, _ in results] == [200] * 50
    expected = sorted(f"You said: hi from {n}" for n in range(50))
    assert sorted(text for _, text in results) == expected


def test_message_limit_is_exact_across_workers(
    real_redis: Any, fake: FakeResponses, tmp_path: Path
) -> None:
    fake.clear()
    store = f"sqlite:///{tmp_path}/threads.db"
    svc = Service(tmp_path, fake, store, CHATKIT_RATELIMIT_PER_USER="5 per minute")
    try:
        first = svc.post({"type": "threads.list", "params": {}})
        cookie = first.cookies["chatkit_session_id"]
        body = {"type": "threads.create", "params": {"input": user_input("count me")}}
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _: svc.post(body, cookie), range(12)))
        kinds = Counter(
            "error" if events(r.content)[0]["type"] == "error" else "answer" for r in replies
        )
        assert kinds == {"answer": 5, "error": 7}
        assert fake.count == 5  # no refused message reached the model
        assert all(r.status_code == 200 for r in replies)
        # Reads still work for the limited visitor.
        assert svc.post({"type": "threads.list", "params": {}}, cookie).status_code == 200
    finally:
        svc.stop()


def test_hanging_up_aborts_the_model_and_keeps_the_partial_answer(
    service: Service, fake: FakeResponses
) -> None:
    first = service.post({"type": "threads.list", "params": {}})
    cookie = first.cookies["chatkit_session_id"]
    fake.token_delay = 0.2
    words = " ".join(f"word{n}" for n in range(60))
    body = json.dumps({"type": "threads.create", "params": {"input": user_input(words)}})
    try:
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        sock.sendall(
            (
                f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Cookie: chatkit_session_id={cookie}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        received = b""
        while b'"delta":" word0"' not in received:  # the answer's first words are out
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        closed_at = time.monotonic()
        sock.close()
        aborted = fake.wait_for_abort(1, timeout=5)
    finally:
        fake.token_delay = 0.0
    assert aborted, "the model request kept running after the visitor left"
    assert fake.aborts[-1].at - closed_at < 2.0
    time.sleep(0.5)
    threads = service.post({"type": "threads.list", "params": {}}, cookie).json()["data"]
    assert len(threads) == 1
    page = service.post(
        {"type": "items.list", "params": {"thread_id": threads[0]["id"], "limit": 50}}, cookie
    ).json()["data"]
    partial = [i for i in page if i["type"] == "assistant_message"]
    assert partial and partial[0]["content"][0]["text"].startswith("You said: word0")


def test_a_stream_longer_than_the_worker_timeout(
    real_redis: Any, fake: FakeResponses, tmp_path: Path
) -> None:
    fake.clear()
    svc = Service(tmp_path, fake, f"sqlite:///{tmp_path}/threads.db", GUNICORN_TIMEOUT="2")
    fake.token_delay = 0.25
    try:
        text = " ".join(f"w{n}" for n in range(16))  # about 4.5 s of tokens
        started = time.monotonic()
        reply = svc.post({"type": "threads.create", "params": {"input": user_input(text)}})
        elapsed = time.monotonic() - started
        done = [e for e in events(reply.content) if e["type"] == "thread.item.done"]
        assert elapsed > 3
        assert done[-1]["item"]["content"][0]["text"] == f"You said: {text}"
    finally:
        fake.token_delay = 0.0
        svc.stop()


def test_the_master_imports_the_sql_store_only_when_it_is_the_store(
    service: Service, request: pytest.FixtureRequest
) -> None:
    """The warm-up in gunicorn's master imports what the workers will import, SQLAlchemy and
    psycopg too when the store is PostgreSQL (the workers then share those pages instead of
    each loading its own copy), and not with another store (no memory spent on them)."""
    store = request.node.callspec.params["service"]
    libraries = Path(f"/proc/{service.process.pid}/maps").read_text()
    assert ("/sqlalchemy/" in libraries) == (store == "postgres"), store
    assert ("/psycopg_binary/" in libraries) == (store == "postgres"), store


@pytest.mark.parametrize("service", ["sqlite"], indirect=True)
def test_sighup_starts_workers_that_answer(service: Service, fake: FakeResponses) -> None:
    """SIGHUP (a code reload) replaces the workers; the master, which imported the app's modules
    before the first fork, imports them again (on_reload), and the new workers answer, carrying on
    the visitor's thread."""
    first = service.post({"type": "threads.create", "params": {"input": user_input("before")}})
    assert first.status_code == 200, first.text
    cookie = first.cookies["chatkit_session_id"]
    thread = events(first.content)[0]["thread"]["id"]
    old: set[str] = set()
    for _ in range(50):  # a reply's access line is written once it has been sent
        old = service.workers_of([first.headers["X-Request-ID"]])
        if old:
            break
        time.sleep(0.1)
    assert old, "the access log names no worker"
    service.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while True:
        reply = service.post(
            {"type": "threads.add_user_message",
             "params": {"thread_id": thread, "input": user_input("after")}},
            cookie,
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        time.sleep(0.3)  # its access line
        if service.workers_of([reply.headers["X-Request-ID"]]) - old:
            break  # answered by a worker started by the reload
        assert time.monotonic() < deadline, "no new worker answered within 60 s"
        time.sleep(0.5)
    done = [e for e in events(reply.content) if e["type"] == "thread.item.done"]
    assert done[-1]["item"]["content"][0]["text"] == "You said: after"
    log = service.log_path.read_text()
    assert "Handling signal: hup" in log.lower() or "hang up" in log.lower(), log[-2000:]
    assert "app modules not reloaded" not in log
