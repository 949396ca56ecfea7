"""Server mode's costs and data: token budgets per visitor and site-wide (in Redis, shared by
every worker), and the operator's commands over a person's threads (list, purge, prune).

The commands run on every thread store (``store_url``); the budget tests keep threads in SQLite
(the budgets live in the limiter's Redis whatever the store)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from chatkit_flask.service import create_app
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.conftest import REDIS_URL, TEST_SECRET_KEY
from tests.server_support import sse_events as events
from tests.server_support import user_input
from tests.test_server_mode import close_app

MODEL_KEY = "test-model-key-not-a-real-one"
URL = "/api/chatkit"
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=MODEL_KEY) as server:
        yield server


@pytest.fixture
def make_server_app(
    fake: FakeResponses, tmp_path: Path, real_redis: Any
) -> Iterator[Callable[..., Flask]]:
    fake.clear()
    apps: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        config = {
            "CHATKIT_BACKEND": "server",
            "OPENAI_API_KEY": MODEL_KEY,
            "OPENAI_BASE_URL": fake.base_url,
            "SECRET_KEY": TEST_SECRET_KEY,
            "CHATKIT_COOKIE_SECURE": False,
            "CHATKIT_STORE_URL": f"sqlite:///{tmp_path}/threads.db",
            "RATELIMIT_STORAGE_URI": REDIS_URL,
            "TESTING": True,
            **overrides,
        }
        apps.append(create_app(config, environ={}))
        return apps[-1]

    yield factory
    for app in apps:
        close_app(app)


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
    stream = events(response.data)
    response.close()  # as a WSGI server does: the usage is charged when the stream ends
    return stream


def wait_charged(app: Flask, owner_key_part: str = "tokens") -> None:
    """The charge runs off the event loop: give it a moment."""
    import time

    time.sleep(0.2)


def test_a_visitor_over_their_token_budget_is_refused_readably(
    make_server_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    app = make_server_app(CHATKIT_TOKENS_PER_USER="100 per day")
    client = app.test_client()
    first = send(client, "a first question that costs tokens")
    thread = first[0]["thread"]["id"]
    wait_charged(app)
    while True:  # each reply reports usage; stop once the budget is spent
        reply = send(client, "more please", thread)
        wait_charged(app)
        if reply[0]["type"] == "error":
            break
        assert fake.count < 20, "the budget never ran out"
    calls = fake.count
    assert len(reply) == 1
    assert reply[0]["code"] == "custom"
    assert "share of the assistant" in reply[0]["message"]
    assert "Try again in" in reply[0]["message"]
    send(client, "still refused?", thread)
    assert fake.count == calls  # a refused message never reaches the model
    # Another visitor has their own budget.
    other = send(app.test_client(), "hello")
    assert other[0]["type"] == "thread.created"


def test_the_site_budget_is_shared_by_every_worker(
    make_server_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    """Two apps on one Redis stand in for two gunicorn workers (or hosts)."""
    first, second = (make_server_app(CHATKIT_TOKENS_GLOBAL="200 per hour") for _ in range(2))
    spent = False
    for n in range(20):
        app = (first, second)[n % 2]
        reply = send(app.test_client(), f"visitor {n}")
        wait_charged(app)
        if reply[0]["type"] == "error":
            spent = True
            assert "site's budget" in reply[0]["message"]
            break
    assert spent
    # Replies were answered by both apps until their shared count passed 200 tokens.
    assert 2 <= fake.count < 20


def test_purge_lists_and_erases_one_visitors_threads(
    make_server_app: Callable[..., Flask], store_url: str
) -> None:
    app = make_server_app(CHATKIT_STORE_URL=store_url)
    alice, bob = app.test_client(), app.test_client()
    for text in ("one", "two"):
        send(alice, text)
    send(bob, "bob's")
    cookie = alice.get_cookie("chatkit_session_id").value
    runner = app.test_cli_runner()
    listed = runner.invoke(args=["chatkit", "threads", "--visitor", cookie])
    assert listed.exit_code == 0, listed.output
    assert "2 thread(s)" in listed.output
    assert "one" not in listed.output.split(":", 1)[1]  # ids and dates only, never text
    purged = runner.invoke(args=["chatkit", "purge", "--visitor", cookie, "--yes"])
    assert "Deleted 2 thread(s)" in purged.output
    after = alice.post(URL, json={"type": "threads.list", "params": {}}).get_json()
    assert after["data"] == []
    bobs = bob.post(URL, json={"type": "threads.list", "params": {}}).get_json()
    assert len(bobs["data"]) == 1  # nobody else's threads are touched


def test_purge_by_signed_in_user_and_prune(fake: FakeResponses, store_url: str) -> None:
    from chatkit_flask import ChatKit

    fake.clear()
    app = Flask("host")
    app.config.update(
        CHATKIT_BACKEND="server",
        OPENAI_API_KEY=MODEL_KEY,
        OPENAI_BASE_URL=fake.base_url,
        SECRET_KEY=TEST_SECRET_KEY,
        CHATKIT_COOKIE_SECURE=False,
        CHATKIT_STORE_URL=store_url,
        RATELIMIT_ENABLED=False,
        CHATKIT_THREAD_TTL=60,
    )
    chatkit = ChatKit(app)
    chatkit.user_loader(lambda: "ada")
    send(app.test_client(), "mine")
    runner = app.test_cli_runner()
    assert "1 thread(s)" in runner.invoke(args=["chatkit", "threads", "--user", "ada"]).output
    pruned = runner.invoke(args=["chatkit", "prune"])
    assert "Pruned 0 thread(s) inactive for CHATKIT_THREAD_TTL=60s" in pruned.output
    server = app.extensions["chatkit"].server
    import time

    try:
        assert server.bridge.run(lambda: server.store.prune(now=time.time() + 120), 10) == 1
        assert "0 thread(s)" in runner.invoke(args=["chatkit", "threads", "--user", "ada"]).output
    finally:
        close_app(app)


def test_data_commands_refuse_in_hosted_mode(make_app: Callable[..., Flask]) -> None:
    result = make_app().test_cli_runner().invoke(args=["chatkit", "threads", "--user", "x"])
    assert result.exit_code != 0
    assert "server mode only" in result.output


def test_model_failure_is_not_charged(
    make_server_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    app = make_server_app(CHATKIT_TOKENS_PER_USER="1 per day")
    client = app.test_client()
    fake.enqueue(Reply.error(500))
    failed = send(client, "this fails upstream")
    wait_charged(app)
    assert any(e["type"] == "error" for e in failed)
    reply = send(client, "now it works")
    assert reply[0]["type"] == "thread.created"  # nothing was charged for the failure
