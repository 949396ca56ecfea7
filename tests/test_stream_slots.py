"""Stream slots (issue 24 item 1, issue 22 item 6): a slot belongs to one reply, is renewed while
that reply streams, lapses on its own once its holder stops renewing it, and a refused attempt
changes nothing. Against the real Redis, and under gunicorn with a worker killed mid-reply."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from limits.storage import storage_from_string

from chatkit_flask.server.slots import StreamSlots
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.conftest import REDIS_URL, TEST_API_KEY
from tests.server_support import sse_events, user_input

OWNER = "visitor:alice"


@pytest.fixture
def slots_on_redis(real_redis: Any) -> Any:
    storage = storage_from_string(REDIS_URL)
    return lambda cap, lease: StreamSlots(lambda: storage, cap, lease)


def snapshot(real_redis: Any) -> tuple[list[Any], int]:
    key = f"chatkit:streams:{OWNER}"
    return real_redis.zrange(key, 0, -1, withscores=True), real_redis.pttl(key)


def test_a_refused_attempt_changes_nothing(slots_on_redis: Any, real_redis: Any) -> None:
    slots = slots_on_redis(2, 30)
    held = [slots.acquire(OWNER), slots.acquire(OWNER)]
    members, ttl = snapshot(real_redis)

    for _ in range(20):
        assert slots.acquire(OWNER) is None

    members_after, ttl_after = snapshot(real_redis)
    assert all(held) and len(members) == 2
    assert members_after == members  # no deadline moved
    assert ttl_after <= ttl  # the key's expiry was not extended by knocking


def test_a_slot_whose_holder_died_lapses_within_the_lease(slots_on_redis: Any) -> None:
    slots = slots_on_redis(1, 1.0)
    assert slots.acquire(OWNER) is not None  # its holder never renews nor releases (killed)
    assert slots.acquire(OWNER) is None

    time.sleep(1.1)

    assert slots.acquire(OWNER) is not None


def test_a_streaming_reply_keeps_its_slot_past_the_lease(slots_on_redis: Any) -> None:
    slots = slots_on_redis(1, 1.0)
    slot = slots.acquire(OWNER)
    assert slot is not None

    def slow_body() -> Iterator[bytes]:
        for _ in range(12):  # 3 s of frames, three times the lease
            time.sleep(0.25)
            yield b"data: {}\n\n"

    refusals = []
    body = slot.hold(slow_body())
    for _ in body:
        refusals.append(slots.acquire(OWNER) is None)
    assert all(refusals)  # nobody got a second slot while the reply streamed
    assert slots.acquire(OWNER) is not None  # read to its end: freed without close()


def test_release_is_once_and_close_releases(slots_on_redis: Any, real_redis: Any) -> None:
    slots = slots_on_redis(2, 30)
    first, second = slots.acquire(OWNER), slots.acquire(OWNER)
    assert first is not None and second is not None

    first.hold(iter([b"x"])).close()
    first.release()

    assert [m for m, _ in snapshot(real_redis)[0]] == [second.token.encode()]


def test_in_process_slots_without_redis() -> None:
    from limits.storage import MemoryStorage

    storage = MemoryStorage()
    slots = StreamSlots(lambda: storage, 1, 30)
    slot = slots.acquire(OWNER)
    assert slot is not None and slots.acquire(OWNER) is None
    list(slot.hold(iter([b"a", b"b"])))
    assert slots.acquire(OWNER) is not None


# --------------------------------------------------- a worker killed mid-reply
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_after_a_worker_is_killed_its_visitor_sends_again_within_the_lease(
    real_redis: Any, tmp_path: Path
) -> None:
    from tests.test_server_gunicorn import MODEL_KEY, Service

    lease = 6.0
    with FakeResponses(api_key=MODEL_KEY) as fake:
        service = Service(
            tmp_path,
            fake,
            f"sqlite:///{tmp_path}/threads.db",
            CHATKIT_MAX_STREAMS_PER_USER="2",
            CHATKIT_STREAM_SLOT_LEASE=str(lease),
            GUNICORN_WORKERS="1",
        )
        try:
            cookie = requests.get(service.base + "/api/chatkit/config", timeout=5).cookies[
                "chatkit_session_id"
            ]
            long_text = " ".join(f"w{i}" for i in range(400))
            for _ in range(2):
                fake.enqueue(Reply(text=long_text, token_delay=0.05))
            body = {"type": "threads.create", "params": {"input": user_input("long")}}
            streams = [
                threading.Thread(target=_read_quietly, args=(service, body, cookie))
                for _ in range(2)
            ]
            for stream in streams:
                stream.start()
            fake.wait_for(2)
            time.sleep(lease)  # both replies stream past one lease: still held (renewed)
            assert _refused(service.post(body, cookie))

            worker = _worker_pid(service)
            os.kill(worker, signal.SIGKILL)  # an OOM kill: no release, no renewal
            killed_at = time.monotonic()
            fake.clear()
            ready_at = _wait_for_new_worker(service)
            answered_at = None
            while time.monotonic() - killed_at < lease + 10:
                t0 = time.monotonic()
                response = service.post(body, cookie)
                if response.status_code == 200 and not _refused(response):
                    answered_at = t0  # when the accepted attempt was sent
                    break
                time.sleep(0.25)
            for stream in streams:
                stream.join(10)
        finally:
            service.stop()

    assert answered_at is not None, "the visitor stayed locked out"
    # The slots lapse one lease after their last renewal (at most lease / 3 before the kill):
    # the first attempt sent after that (and after the master booted a new worker) is taken.
    assert answered_at - max(ready_at, killed_at + lease) <= 1


def _read_quietly(service: Any, body: dict[str, Any], cookie: str) -> None:
    with contextlib.suppress(requests.RequestException):  # cut by the kill
        service.post(body, cookie)


def _wait_for_new_worker(service: Any) -> float:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(service.base + "/healthz", timeout=1).status_code == 200:
                return time.monotonic()
        time.sleep(0.1)
    raise AssertionError("no new worker within 30 s")


def _refused(response: requests.Response) -> bool:
    events = sse_events(response.content)
    return any(e.get("type") == "error" and "replies on the way" in e["message"] for e in events)


def _worker_pid(service: Any) -> int:
    children = Path(f"/proc/{service.process.pid}/task/{service.process.pid}/children")
    pids = [int(p) for p in children.read_text().split()]
    assert len(pids) == 1
    return pids[0]


# ------------------------------------------ issue 22 item 8: one reply per thread
@pytest.mark.parametrize("storage", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_second_message_to_a_thread_waits_for_the_first_reply(
    storage: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from chatkit_flask.service import create_app
    from tests.test_server_mode import (
        answer,
        assert_refused_in_stream,
        close_app,
        item_list,
        message_body,
        post,
        server_config,
    )

    if storage == "redis":
        request.getfixturevalue("real_redis")
    with FakeResponses(api_key=TEST_API_KEY) as fake:
        app = create_app(
            server_config(
                fake,
                f"sqlite:///{tmp_path}/threads.db",
                RATELIMIT_STORAGE_URI="memory://" if storage == "memory" else REDIS_URL,
            ),
            environ={},
        )
        try:
            client = app.test_client()
            created = post(client, {"type": "threads.create", "params": {"input": user_input("a")}})
            thread_id = sse_events(created.data)[0]["thread"]["id"]
            other = sse_events(
                post(client, {"type": "threads.create", "params": {"input": user_input("b")}}).data
            )[0]["thread"]["id"]
            slow_text = " ".join(f"w{i}" for i in range(15))
            fake.enqueue(Reply(text=slow_text, token_delay=0.1))
            results: dict[str, Any] = {}
            first = threading.Thread(
                target=lambda: results.update(first=post(client, message_body(thread_id, "one")))
            )
            first.start()
            fake.wait_for(3)  # the first reply in that thread is streaming

            second = post(client, message_body(thread_id, "two"))
            elsewhere = post(client, message_body(other, "in another thread"))
            first.join(20)
            after = post(client, message_body(thread_id, "three"))
            items = item_list(client, thread_id)
        finally:
            close_app(app)

    assert_refused_in_stream(second, "A reply is still being written in this conversation")
    assert answer(sse_events(elsewhere.data)) == "You said: in another thread"
    assert answer(sse_events(results["first"].data)) == slow_text
    assert answer(sse_events(after.data)) == "You said: three"
    user_texts = [i["content"][0]["text"] for i in items if i["type"] == "user_message"]
    assert user_texts == ["a", "one", "three"]  # the refused message was never stored


# ------------------------- issue 22 item 1: caps per client network and per worker
def _slow_replies(fake: FakeResponses, n: int) -> None:
    for _ in range(n):
        fake.enqueue(Reply(text=" ".join(f"w{i}" for i in range(15)), token_delay=0.1))


@pytest.mark.parametrize(
    "holders, newcomer, refused_words",
    [
        # Fresh cookies from one address: the per-visitor cap does not see them, this does.
        (["10.0.0.7"] * 2, "10.0.0.7", "Too many replies are on their way to your network"),
        # IPv6 is counted per /64.
        (["2001:db8:1:2::a", "2001:db8:1:2::b"], "2001:db8:1:2::c", "your network"),
    ],
    ids=["ipv4", "ipv6 /64"],
)
def test_open_replies_are_capped_per_client_network(
    tmp_path: Path, holders: list[str], newcomer: str, refused_words: str
) -> None:
    from chatkit_flask.service import create_app
    from tests.test_server_mode import (
        answer,
        assert_refused_in_stream,
        close_app,
        post,
        server_config,
    )

    with FakeResponses(api_key=TEST_API_KEY) as fake:
        app = create_app(
            server_config(fake, f"sqlite:///{tmp_path}/t.db", CHATKIT_MAX_STREAMS_PER_IP=2),
            environ={},
        )
        try:
            _slow_replies(fake, len(holders))
            body = {"type": "threads.create", "params": {"input": user_input("hi")}}
            streams = [
                threading.Thread(
                    target=post,
                    args=(app.test_client(), body),
                    kwargs={"environ_base": {"REMOTE_ADDR": address}},
                )
                for address in holders
            ]
            for stream in streams:
                stream.start()
            fake.wait_for(len(holders))

            refused = post(app.test_client(), body, environ_base={"REMOTE_ADDR": newcomer})
            elsewhere = post(app.test_client(), body, environ_base={"REMOTE_ADDR": "192.0.2.9"})
            for stream in streams:
                stream.join(20)
            later = post(app.test_client(), body, environ_base={"REMOTE_ADDR": newcomer})
        finally:
            close_app(app)

    assert_refused_in_stream(refused, refused_words)
    assert answer(sse_events(elsewhere.data)) == "You said: hi"
    assert answer(sse_events(later.data)) == "You said: hi"  # freed when the replies ended


def test_a_worker_keeps_threads_for_reads(tmp_path: Path) -> None:
    from chatkit_flask.service import create_app
    from tests.test_server_mode import (
        assert_refused_in_stream,
        close_app,
        post,
        server_config,
        thread_ids,
    )

    with FakeResponses(api_key=TEST_API_KEY) as fake:
        app = create_app(
            server_config(fake, f"sqlite:///{tmp_path}/t.db", CHATKIT_MAX_STREAMS_PER_WORKER=1),
            environ={},
        )
        try:
            _slow_replies(fake, 1)
            body = {"type": "threads.create", "params": {"input": user_input("hi")}}
            holder = app.test_client()
            stream = threading.Thread(target=post, args=(holder, body))
            stream.start()
            fake.wait_for(1)
            refused = post(app.test_client(), body, environ_base={"REMOTE_ADDR": "192.0.2.9"})
            reads = thread_ids(app.test_client())  # a read is never refused by this cap
            stream.join(20)
        finally:
            close_app(app)

    assert_refused_in_stream(refused, "The chat is very busy right now")
    assert reads == []
