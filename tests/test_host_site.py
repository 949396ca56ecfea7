"""Server mode inside an existing Flask site (issue 23): the operator's commands count server
mode's limits, the site's own default limits leave the chat alone, log-out forgets the anonymous
visitor and log-in may adopt their threads, and a shortened retention reaches stored threads.

Everything goes through a host app's test client and Flask's CliRunner, with the model on a
loopback socket (FakeResponses), limits in the real Redis and threads in SQLite and Redis."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask, jsonify, request
from flask_limiter import Limiter
from flask_limiter.commands import cli as limiter_cli
from flask_limiter.util import get_remote_address
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user

from chatkit_flask import ChatKit
from chatkit_flask.identity import hash_id
from chatkit_flask.testing.fake_responses import FakeResponses
from tests.conftest import REDIS_URL, TEST_SECRET_KEY
from tests.server_support import sse_events, user_input
from tests.services import SUITE_REDIS

MODEL_KEY = "test-model-key-not-a-real-one"
URL = "/api/chatkit"
COOKIE = "chatkit_session_id"
STORE_REDIS_URL = SUITE_REDIS.url(12)  # the thread store; the limiter uses REDIS_URL (15)
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=MODEL_KEY) as server:
        yield server


@pytest.fixture
def store_redis(redis_server: Any) -> Iterator[str]:
    """The suite's Redis for threads (its own database), emptied before and after."""
    client = redis.Redis.from_url(STORE_REDIS_URL, socket_timeout=1)
    client.flushdb()
    yield STORE_REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return request.getfixturevalue("store_redis")
    return f"sqlite:///{tmp_path}/threads.db"


def server_config(fake: FakeResponses, store_url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "CHATKIT_BACKEND": "server",
        "OPENAI_API_KEY": MODEL_KEY,
        "OPENAI_BASE_URL": fake.base_url,
        "SECRET_KEY": TEST_SECRET_KEY,
        "CHATKIT_COOKIE_SECURE": False,
        "CHATKIT_STORE_URL": store_url,
        "RATELIMIT_STORAGE_URI": "memory://",
        "TESTING": True,
        **overrides,
    }


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def login_host(config: dict[str, Any], limiter: Limiter | None = None) -> Flask:
    """A site with Flask-Login (and its own limiter, when given), ChatKit added the README way."""
    app = Flask("host")
    app.config.update(config)
    login_manager = LoginManager(app)
    login_manager.user_loader(User)
    chatkit = ChatKit(limiter=limiter)

    @chatkit.user_loader
    def chat_user() -> str | None:
        return current_user.get_id() if current_user.is_authenticated else None

    if limiter is not None:
        limiter.init_app(app)
    chatkit.init_app(app)

    @app.post("/login")
    def login() -> Any:
        login_user(User(request.form["user"]))
        return jsonify(ok=True)

    @app.post("/logout")
    def logout() -> Any:
        logout_user()
        return jsonify(ok=True)

    @app.get("/page")
    def page() -> Any:
        return jsonify(ok=True)

    return app


def send(client: Any, text: str, thread: str | None = None) -> list[dict[str, Any]]:
    if thread is None:
        body = {"type": "threads.create", "params": {"input": user_input(text)}}
    else:
        body = {
            "type": "threads.add_user_message",
            "params": {"thread_id": thread, "input": user_input(text)},
        }
    response = client.post(URL, json=body)
    assert response.status_code == 200
    events = sse_events(response.data)
    response.close()  # as a WSGI server does: the stream's slot and usage are settled now
    return events


def thread_ids(client: Any) -> list[str]:
    response = client.post(URL, json={"type": "threads.list", "params": {}})
    assert response.status_code == 200, response.get_data(as_text=True)
    return [thread["id"] for thread in response.get_json()["data"]]


def run(app: Flask, *args: str) -> Any:
    result = app.test_cli_runner().invoke(args=["chatkit", *args])
    return result


def wait_for(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """The token charge runs off the event loop once the stream ends."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- 4. the operator's commands count server mode's limits ---------------------------------------


def test_usage_and_reset_cover_messages_streams_and_tokens(
    fake: FakeResponses, tmp_path: Path, real_redis: redis.Redis
) -> None:
    app = login_host(
        server_config(
            fake,
            f"sqlite:///{tmp_path}/threads.db",
            RATELIMIT_STORAGE_URI=REDIS_URL,
            CHATKIT_RATELIMIT_PER_USER="3 per minute;100 per day",
            CHATKIT_TOKENS_PER_USER="100000 per day",
        )
    )
    client = app.test_client()
    first = send(client, "one")
    send(client, "two", first[0]["thread"]["id"])
    cookie = client.get_cookie(COOKIE).value
    owner = "visitor:" + hash_id(cookie.split(".", 1)[0])

    def token_keys() -> list[bytes]:
        return [k for k in real_redis.keys("*tokens*") if owner.encode() in k]

    def settled() -> bool:
        # A reply's reservation (its input and max_output_tokens, 1024) is in the counter until
        # its settle lands, off the loop after the stream ends: two short answers settle below it.
        return bool(token_keys()) and 0 < int(real_redis.get(token_keys()[0]) or 0) < 1024

    wait_for(settled)
    spent = int(real_redis.get(token_keys()[0]))

    usage = run(app, "usage", "--visitor", cookie)
    assert usage.exit_code == 0, usage.output
    assert f"user limits for {owner}:" in usage.output
    assert "messages 3 per 1 minute: 1 of 3 remaining (2 used, resets in" in usage.output
    assert "messages 100 per 1 day: 98 of 100 remaining (2 used" in usage.output
    assert "streams: 0 of 2 open" in usage.output
    assert f"tokens 100000 per 1 day: {100000 - spent} of 100000 remaining ({spent} used" in (
        usage.output
    )
    # Flask-Limiter's own view of the same counter agrees.
    own = app.test_cli_runner().invoke(
        limiter_cli, ["limits", "--endpoint", "chatkit.chatkit", "--key", owner]
    )
    assert "1 out of 3 remaining" in own.output, own.output

    send(client, "three", first[0]["thread"]["id"])
    refused = send(client, "four", first[0]["thread"]["id"])
    assert refused[0]["type"] == "error" and "too many messages" in refused[0]["message"]
    app.extensions["chatkit"].server.slots.acquire(owner)  # a stream a dead worker left
    assert "streams: 1 of 2 open" in run(app, "usage", "--visitor", cookie).output

    reset = run(app, "reset", "--visitor", cookie)
    assert reset.exit_code == 0, reset.output
    assert f"Cleared 4 user limit counter(s) for {owner} (4 had been used)." in reset.output
    after = run(app, "usage", "--visitor", cookie).output
    assert "messages 3 per 1 minute: 3 of 3 remaining (0 used)" in after
    assert "streams: 0 of 2 open" in after
    assert "tokens 100000 per 1 day: 100000 of 100000 remaining (0 used)" in after
    assert send(client, "five", first[0]["thread"]["id"])[0]["type"] != "error"


def test_usage_and_reset_of_an_ip_and_the_site(
    fake: FakeResponses, tmp_path: Path, real_redis: redis.Redis
) -> None:
    app = login_host(
        server_config(
            fake,
            f"sqlite:///{tmp_path}/threads.db",
            RATELIMIT_STORAGE_URI=REDIS_URL,
            CHATKIT_TOKENS_GLOBAL="1000000 per day",
        )
    )
    client = app.test_client()
    send(client, "one")
    send(client, "two")
    thread_ids(client)  # a read: counted by the requests limit only
    wait_for(lambda: any(b"global" in k for k in real_redis.keys("*tokens*")))

    ip = run(app, "usage", "--ip", "127.0.0.1")
    assert ip.exit_code == 0, ip.output
    assert "messages 30 per 1 minute: 28 of 30 remaining (2 used" in ip.output
    assert "requests 300 per 1 minute: 297 of 300 remaining (3 used" in ip.output
    site = run(app, "usage", "--global")
    assert "messages 2000 per 1 day: 1998 of 2000 remaining (2 used" in site.output
    assert "tokens_global 1000000 per 1 day:" in site.output
    assert "(0 used)" not in site.output.split("tokens_global", 1)[1]

    reset = run(app, "reset", "--global")
    assert "Cleared 2 global limit counter(s) for global (2 had been used)." in reset.output
    assert not [k for k in real_redis.keys("*tokens*") if b"global" in k]
    assert "tokens_global 1000000 per 1 day: 1000000 of 1000000 remaining (0 used)" in (
        run(app, "usage", "--global").output
    )
    assert "requests 300 per 1 minute: 297 of 300" in run(app, "usage", "--ip", "127.0.0.1").output


def test_limits_lists_every_limit_of_server_mode(fake: FakeResponses, tmp_path: Path) -> None:
    limiter = Limiter(get_remote_address, default_limits=["50 per hour"], storage_uri="memory://")
    app = login_host(
        server_config(
            fake,
            f"sqlite:///{tmp_path}/threads.db",
            CHATKIT_TOKENS_PER_USER="200000 per day",
            RATELIMIT_APPLICATION="1000 per hour",
        ),
        limiter,
    )
    result = run(app, "limits")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for line in (
        "per user:     10 per minute; 100 per day (messages)",
        "per IP:       30 per minute; 200 per day (messages) (IPv6 per /64)",
        "requests/IP:  300 per minute (every request)",
        "streams:      2 at once per visitor or user",
        "tokens/user:  200000 per day",
        "tokens/site:  off",
        "host app:     1000 per 1 hour (counts the chat too)",
        "host default: 50 per 1 hour (not on the chat's routes: CHATKIT_HOST_DEFAULT_LIMITS=false)",
    ):
        assert line in lines, (line, lines)
    group_help = app.test_cli_runner().invoke(args=["chatkit", "--help"]).output
    assert "hosted mode" in group_help and "server mode" in group_help


# -- 5. the site's default limits leave the chat alone -------------------------------------------


@pytest.mark.parametrize("opted_in", [False, True])
def test_the_sites_default_limits_do_not_throttle_the_chat(
    fake: FakeResponses, tmp_path: Path, opted_in: bool
) -> None:
    limiter = Limiter(get_remote_address, default_limits=["3 per hour"], storage_uri="memory://")
    app = login_host(
        server_config(
            fake,
            f"sqlite:///{tmp_path}/threads.db",
            CHATKIT_RATELIMIT_PER_USER="4 per minute",
            CHATKIT_HOST_DEFAULT_LIMITS=opted_in,
        ),
        limiter,
    )
    client = app.test_client()
    assert [client.get("/page").status_code for _ in range(4)] == [200, 200, 200, 429]
    config = [client.get(f"{URL}/config") for _ in range(4)]
    static = client.get(f"{URL}/static/chatkit-secret.js")
    static.close()
    if opted_in:  # the host asked for its defaults on the chat's routes too
        assert [r.status_code for r in config] == [200, 200, 200, 429]
        assert config[-1].get_json()["scope"] == "site"
        return
    assert [r.status_code for r in config] == [200] * 4
    assert static.status_code == 200
    # The chat's own limits still apply: 4 messages a minute, the fifth refused in the stream.
    replies = [send(client, f"message {n}")[0]["type"] for n in range(5)]
    assert replies == ["thread.created"] * 4 + ["error"]
    # Flask-Limiter's CLI shows what really applies to each route.
    shown = app.test_cli_runner().invoke(limiter_cli, ["limits"]).output
    chat = shown.split("chatkit.config", 1)[1].split("host", 1)[0]
    assert "Exempt" in chat and "3 per 1 hour" not in chat
    assert "4 per 1 minute" in shown.split("chatkit.chatkit", 1)[1].split("chatkit.config", 1)[0]
    assert "3 per 1 hour" in shown.split("page: /page", 1)[1]


# -- 7. log-out forgets the anonymous visitor; log-in may adopt their threads --------------------


@pytest.mark.parametrize("forget", [True, False])
def test_log_out_forgets_the_anonymous_visitor(
    fake: FakeResponses, tmp_path: Path, forget: bool
) -> None:
    app = login_host(
        server_config(
            fake, f"sqlite:///{tmp_path}/threads.db", CHATKIT_FORGET_VISITOR_ON_LOGOUT=forget
        )
    )
    client = app.test_client()  # a shared computer's browser
    send(client, "asked before logging in")
    before = client.get_cookie(COOKIE).value
    assert len(thread_ids(client)) == 1
    client.post("/login", data={"user": "ada"})
    assert thread_ids(client) == []  # the account's own threads (adoption is off)
    logout = client.post("/logout")
    if not forget:  # the site chose to keep the visitor: the old threads come back
        assert len(thread_ids(client)) == 1
        return
    dropped = [h for h in logout.headers.getlist("Set-Cookie") if h.startswith(f"{COOKIE}=")]
    assert dropped and "Max-Age=0" in dropped[0] and "Path=/" in dropped[0]
    assert client.get_cookie(COOKIE) is None
    assert thread_ids(client) == []  # the next person is a new visitor
    assert client.get_cookie(COOKIE).value != before


def test_log_in_adopts_the_visitors_threads_when_the_site_chooses(
    fake: FakeResponses, store_url: str
) -> None:
    app = login_host(server_config(fake, store_url, CHATKIT_ADOPT_VISITOR_THREADS=True))
    client = app.test_client()
    mine = sorted(send(client, text)[0]["thread"]["id"] for text in ("one", "two"))
    other = app.test_client()
    send(other, "someone else's")
    other.post("/login", data={"user": "bob"})

    client.post("/login", data={"user": "ada"})
    assert sorted(thread_ids(client)) == mine
    assert send(client, "and now signed in", mine[0])[0]["type"] != "error"
    assert "2 thread(s)" in run(app, "threads", "--user", "ada").output
    bobs = thread_ids(other)  # bob adopted his own anonymous thread, nobody else's
    assert len(bobs) == 1 and bobs[0] not in mine
    client.post("/logout")
    assert thread_ids(client) == []  # adopted threads are the account's, not the browser's
    client.post("/login", data={"user": "ada"})
    assert sorted(thread_ids(client)) == mine


def test_a_store_down_at_log_in_leaves_the_threads_and_the_log_in_alone(
    fake: FakeResponses, store_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = login_host(server_config(fake, store_redis, CHATKIT_ADOPT_VISITOR_THREADS=True))
    client = app.test_client()
    send(client, "before the outage")
    cookie = client.get_cookie(COOKIE).value
    store = app.extensions["chatkit"].server.store
    store._url, store._client = "redis://127.0.0.1:1/0", None  # nothing listens there
    logger = logging.getLogger("chatkit_flask")
    logger.addHandler(caplog.handler)
    try:
        assert client.post("/login", data={"user": "ada"}).status_code == 200
    finally:
        logger.removeHandler(caplog.handler)
    assert "threads not adopted at log-in (ConnectionError)" in caplog.text
    assert client.get_cookie(COOKIE).value == cookie  # kept: the threads are still the visitor's
    store._url, store._client = store_redis, None  # the store is back
    assert "1 thread(s)" in run(app, "threads", "--visitor", cookie).output
    assert "0 thread(s)" in run(app, "threads", "--user", "ada").output


def test_a_site_without_flask_login_calls_the_one_liners(
    fake: FakeResponses, tmp_path: Path
) -> None:
    from flask import session

    app = Flask("host")
    app.config.update(server_config(fake, f"sqlite:///{tmp_path}/threads.db"))
    chatkit = ChatKit(app)
    chatkit.user_loader(lambda: session.get("user"))
    adopted: list[int] = []

    @app.post("/sign-in")
    def sign_in() -> Any:
        session["user"] = request.form["user"]
        adopted.append(chatkit.adopt_visitor_threads())
        return jsonify(ok=True)

    @app.post("/sign-out")
    def sign_out() -> Any:
        session.pop("user", None)
        chatkit.forget_visitor()
        return jsonify(ok=True)

    client = app.test_client()
    thread = send(client, "anonymous question")[0]["thread"]["id"]
    client.post("/sign-in", data={"user": "ada"})
    assert adopted == [1]
    assert thread_ids(client) == [thread]
    client.post("/sign-out")
    assert thread_ids(client) == []
    client.post("/sign-in", data={"user": "ada"})
    assert adopted == [1, 0]  # a fresh visitor has nothing to give
    assert thread_ids(client) == [thread]


# -- 8. a shortened retention reaches the threads already stored ---------------------------------


def age(store_url: str, thread_id: str, seconds: int) -> None:
    """Make a stored thread's last activity ``seconds`` older, as if written that long ago."""
    if store_url.startswith("sqlite:///"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            db.execute(
                "UPDATE chatkit_threads SET updated_at = updated_at - ? WHERE id = ?",
                (seconds, thread_id),
            )
        return
    client = redis.Redis.from_url(store_url)
    assert client.hincrby(f"chatkit:store:thread:{thread_id}", "active", -seconds * 1000)
    client.close()


def test_a_shortened_ttl_prunes_older_threads(fake: FakeResponses, store_url: str) -> None:
    app = login_host(server_config(fake, store_url))  # the default: 30 days
    client = app.test_client()
    old = send(client, "ten minutes ago")[0]["thread"]["id"]
    age(store_url, old, 600)
    new = send(client, "just now")[0]["thread"]["id"]

    shortened = login_host(server_config(fake, store_url, CHATKIT_THREAD_TTL=60))
    result = run(shortened, "prune")
    assert result.exit_code == 0, result.output
    assert "Pruned 1 thread(s) inactive for CHATKIT_THREAD_TTL=60s or more." in result.output
    assert thread_ids(client) == [new]  # gone for every worker, whatever TTL it runs with
    assert (
        "1 thread(s)"
        in run(shortened, "threads", "--visitor", client.get_cookie(COOKIE).value).output
    )
    if store_url.startswith("redis"):
        raw = redis.Redis.from_url(store_url)
        keys = raw.keys("chatkit:store:*")
        assert keys and all(0 < raw.pttl(key) <= 60_000 for key in keys)
        raw.close()
