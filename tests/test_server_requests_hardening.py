"""Hardening, third round (issue 22), the request checks: the input cap covers tags, ids the
store could not have issued are 404 before the store is touched, ``limit: 0`` is the SDK's
default page, and a hung Redis store fails a request within the store's short timeout.

Paging and ids the store issued run on every store (``store_client``); the input cap is decided
before the store is asked (SQLite), and the key-level checks are the Redis store's own."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("chatkit")
from agents import set_tracing_disabled
from flask.testing import FlaskClient

from chatkit_flask.server import store_redis
from chatkit_flask.server.agent import ModelClient, build_plain_agent
from chatkit_flask.server.bridge import AsyncBridge
from chatkit_flask.server.protocol import FlaskChatKitServer
from chatkit_flask.server.store import open_store
from chatkit_flask.testing.fake_responses import FakeResponses
from tests.conftest import REDIS_URL
from tests.server_support import make_app, sse_events, user_input

KEY = "test-model-key-not-a-real-one"
set_tracing_disabled(True)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def bridge() -> Iterator[AsyncBridge]:
    bridge = AsyncBridge(name="test-hardening")
    yield bridge
    bridge.close()


def server_on(store: Any, fake: FakeResponses, max_input_chars: int = 100) -> FlaskChatKitServer:
    fake.clear()
    fake.token_delay = 0.0
    return FlaskChatKitServer(
        store,
        build_plain_agent("gpt-test", "Answer briefly."),
        ModelClient(api_key=KEY, base_url=fake.base_url),
        max_input_chars=max_input_chars,
    )


@pytest.fixture
def client(fake: FakeResponses, bridge: AsyncBridge, tmp_path: Any) -> FlaskClient:
    store = open_store(f"sqlite:///{tmp_path}/threads.db", thread_ttl=3600)
    return make_app(server_on(store, fake), bridge).test_client()


@pytest.fixture
def store_client(
    fake: FakeResponses, bridge: AsyncBridge, store_url: str
) -> Iterator[FlaskClient]:
    """Every thread store, in turn."""
    store = open_store(store_url, thread_ttl=3600)
    yield make_app(server_on(store, fake), bridge).test_client()
    aclose = getattr(store, "aclose", None)
    if aclose is not None:
        bridge.run(aclose, 5)


@pytest.fixture
def redis_client(
    fake: FakeResponses, bridge: AsyncBridge, real_redis: Any
) -> Iterator[FlaskClient]:
    store = open_store(REDIS_URL, thread_ttl=3600)
    yield make_app(server_on(store, fake), bridge).test_client()


def post(client: FlaskClient, body: dict[str, Any], owner: str = "visitor:alice") -> Any:
    return client.post(
        "/chat",
        data=json.dumps(body),
        buffered=True,
        headers={"X-Owner": owner, "Content-Type": "application/json"},
    )


def create_thread(client: FlaskClient) -> str:
    response = post(client, {"type": "threads.create", "params": {"input": user_input("hi")}})
    assert response.status_code == 200
    return sse_events(response.data)[0]["thread"]["id"]


def tagged_input(text: str, tag_text: str, data: dict[str, Any]) -> dict[str, Any]:
    body = user_input(text)
    body["content"].append(
        {"type": "input_tag", "id": "t1", "text": tag_text, "data": data, "interactive": False}
    )
    return body


# ---------------------------------------------------------- item 5: tags
@pytest.mark.parametrize(
    "tag_text, data",
    [("x" * 200, {}), ("ok", {"blob": "y" * 66_000}), ("ok", {"k": ["z"] * 50})],
    ids=["tag text", "tag data", "tag data list"],
)
def test_tags_count_against_the_input_cap(
    client: FlaskClient, fake: FakeResponses, tag_text: str, data: dict[str, Any]
) -> None:
    body = {"type": "threads.create", "params": {"input": tagged_input("hi", tag_text, data)}}

    response = post(client, body)

    assert response.status_code == 400
    assert response.get_json()["error"] == "input_too_long"
    assert fake.count == 0


def test_a_small_tag_still_goes_through(client: FlaskClient, fake: FakeResponses) -> None:
    body = {"type": "threads.create", "params": {"input": tagged_input("hi", "Ann", {"id": 7})}}

    response = post(client, body)

    assert response.status_code == 200
    assert fake.count == 1


# ------------------------------------------------- item 7: ids by format
@pytest.mark.parametrize(
    "bad_id", ["x:items", "thr_0123:order", "thr_" + "a" * 32 + ":items", "*", "thr_SHORT"]
)
@pytest.mark.parametrize("kind", ["threads.get_by_id", "items.list", "threads.delete"])
def test_a_thread_id_the_store_never_issues_is_404_not_a_store_alarm(
    redis_client: FlaskClient, real_redis: Any, kind: str, bad_id: str
) -> None:
    create_thread(redis_client)
    before = set(real_redis.keys("*"))

    response = post(redis_client, {"type": kind, "params": {"thread_id": bad_id}})

    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"
    assert set(real_redis.keys("*")) == before  # nothing written, nothing read as a key


def test_a_message_to_a_malformed_thread_id_is_404_and_calls_no_model(
    redis_client: FlaskClient, fake: FakeResponses
) -> None:
    body = {
        "type": "threads.add_user_message",
        "params": {"thread_id": "x:items", "input": user_input("hi")},
    }

    response = post(redis_client, body)

    assert response.status_code == 404
    assert fake.count == 0


@pytest.mark.parametrize("field", ["after", "item_id"])
def test_a_malformed_item_id_is_404(store_client: FlaskClient, field: str) -> None:
    thread_id = create_thread(store_client)
    kind = "items.list" if field == "after" else "threads.retry_after_item"

    response = post(store_client, {"type": kind, "params": {"thread_id": thread_id, field: "a:b"}})

    assert response.status_code == 404


def test_well_formed_ids_of_the_store_still_work(store_client: FlaskClient) -> None:
    thread_id = create_thread(store_client)
    listed = post(store_client, {"type": "items.list", "params": {"thread_id": thread_id}})
    first = listed.get_json()["data"][0]["id"]

    paged = post(
        store_client, {"type": "items.list", "params": {"thread_id": thread_id, "after": first}}
    )

    assert paged.status_code == 200
    assert [item["id"] for item in paged.get_json()["data"]] != []


# ----------------------------------------------- item 12: limit 0 = default
def test_limit_zero_is_the_sdks_default_page(store_client: FlaskClient) -> None:
    for _ in range(22):
        create_thread(store_client)

    zero = post(store_client, {"type": "threads.list", "params": {"limit": 0}}).get_json()
    unset = post(store_client, {"type": "threads.list", "params": {}}).get_json()

    assert len(zero["data"]) == len(unset["data"]) == 20  # chatkit's DEFAULT_PAGE_SIZE
    assert zero["has_more"] is True


# ------------------------------------------- item 11: the store's timeout
def test_a_hung_redis_store_fails_a_read_within_the_default_timeout(
    fake: FakeResponses, bridge: AsyncBridge, hung_redis: str
) -> None:
    client = make_app(server_on(open_store(hung_redis, thread_ttl=60), fake), bridge).test_client()

    started = time.monotonic()
    response = post(client, {"type": "threads.list", "params": {}})
    took = time.monotonic() - started

    assert response.status_code == 503
    assert response.get_json()["error"] == "store_unavailable"
    # Connect succeeds (the socket accepts), so the read timeout decides: 3 s, not 10.
    assert store_redis.DEFAULT_TIMEOUT <= took < store_redis.DEFAULT_TIMEOUT + 2


def test_the_store_url_sets_its_own_timeout(
    fake: FakeResponses, bridge: AsyncBridge, hung_redis: str
) -> None:
    url = hung_redis + "?socket_timeout=0.5"
    client = make_app(server_on(open_store(url, thread_ttl=60), fake), bridge).test_client()

    started = time.monotonic()
    response = post(client, {"type": "threads.list", "params": {}})

    assert response.status_code == 503
    assert time.monotonic() - started < 2


# ------------------------------- the same through the extension's endpoint
def test_the_endpoint_answers_a_malformed_thread_id_with_404_and_spends_no_message(
    fake: FakeResponses, tmp_path: Any
) -> None:
    from chatkit_flask.service import create_app
    from tests.test_server_mode import close_app, server_config

    app = create_app(
        server_config(
            fake,
            f"sqlite:///{tmp_path}/threads.db",
            CHATKIT_RATELIMIT_PER_USER="1 per minute",
        ),
        environ={},
    )
    try:
        client = app.test_client()
        client.get("/api/chatkit/config")
        bad = {
            "type": "threads.add_user_message",
            "params": {"thread_id": "x:items", "input": user_input("hi")},
        }
        refused = client.post("/api/chatkit", json=bad)
        # the one message of the minute is still there
        created = client.post(
            "/api/chatkit", json={"type": "threads.create", "params": {"input": user_input("hi")}}
        )

        assert refused.status_code == 404
        assert refused.get_json()["error"] == "not_found"
        assert created.status_code == 200
        assert sse_events(created.data)[0]["type"] == "thread.created"
    finally:
        close_app(app)
