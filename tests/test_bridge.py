"""The asyncio bridge: results, streams, cancellation reaching the producer, loop-thread guard."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from chatkit_flask.server.bridge import AsyncBridge, LoopLocal


@pytest.fixture
def bridge() -> Iterator[AsyncBridge]:
    bridge = AsyncBridge(name="test-bridge")
    yield bridge
    bridge.close()


def test_run_returns_the_result_and_raises_the_error(bridge: AsyncBridge) -> None:
    assert bridge.run(lambda: asyncio.sleep(0, result=42), timeout=2) == 42

    async def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        bridge.run(fail, timeout=2)


def test_run_times_out_and_cancels(bridge: AsyncBridge) -> None:
    cancelled = []

    async def hang() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(TimeoutError):
        bridge.run(hang, timeout=0.1)
    deadline = time.monotonic() + 2
    while not cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cancelled


def test_stream_relays_items_in_order_and_propagates_errors(bridge: AsyncBridge) -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(500):
            yield i
        raise ValueError("producer failed")

    received: list[int] = []
    with pytest.raises(ValueError, match="producer failed"):
        for item in bridge.stream(numbers, queue_size=8):
            received.append(item)
    assert received == list(range(500))


@pytest.mark.parametrize("queue_size", [1, 64], ids=["queue-full", "producer-awaiting"])
def test_closing_the_stream_cancels_inside_the_producer(
    bridge: AsyncBridge, queue_size: int
) -> None:
    """Cleanup written as `except CancelledError` runs, whether the producer was waiting on the
    model (an await) or on a full queue (parked at a yield)."""
    seen: list[str] = []

    async def producer() -> AsyncIterator[int]:
        try:
            for i in range(10_000):
                if i % 2:
                    await asyncio.sleep(0.001)
                yield i
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    frames = bridge.stream(producer, queue_size=queue_size)
    assert next(frames) == 0
    time.sleep(0.05)
    frames.close()  # returns only after the producer's cleanup (or cancel_grace)
    assert seen == ["cancelled"]


def test_refuses_calls_from_the_loop_thread(bridge: AsyncBridge) -> None:
    async def reentrant() -> None:
        bridge.run(lambda: asyncio.sleep(0), timeout=1)

    with pytest.raises(RuntimeError, match="deadlock"):
        bridge.run(reentrant, timeout=2)


def test_loop_local_makes_one_value_per_loop(bridge: AsyncBridge) -> None:
    local = LoopLocal(object)

    async def get() -> object:
        return local.get()

    first = bridge.run(get, timeout=2)
    assert bridge.run(get, timeout=2) is first
    bridge.close()  # a new loop (as after fork) gets a new value
    assert bridge.run(get, timeout=2) is not first


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_loop(bridge: AsyncBridge) -> None:
    parent_loop = bridge.loop
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's loop thread does not exist here
        try:
            ok = bridge.loop is not parent_loop and bridge.run(
                lambda: asyncio.sleep(0, result=True), timeout=2
            )
            os.write(write_fd, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write_fd)
    assert os.read(read_fd, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(read_fd)
    assert bridge.loop is parent_loop


def test_heartbeats_fill_silences_and_idle_timeout_ends_the_wait(bridge: AsyncBridge) -> None:
    async def slow() -> AsyncIterator[str]:
        yield "a"
        await asyncio.sleep(0.35)
        yield "b"
        await asyncio.sleep(30)
        yield "never"

    frames = bridge.stream(slow, heartbeat=0.1, heartbeat_item=":", idle_timeout=0.6)
    received = []
    with pytest.raises(TimeoutError):
        for item in frames:
            received.append(item)
    assert received[0] == "a" and "b" in received
    assert 2 <= received.index("b") - 1 <= 4  # heartbeats during the 0.35 s silence
    assert all(item == ":" for item in received[1:received.index("b")])


def test_a_consumer_stuck_on_one_item_is_given_up_on(bridge: AsyncBridge) -> None:
    """A server stuck writing (a client that does not read): the producer is cancelled inside
    its await and ``on_stall`` runs, after ``write_timeout``, not before."""
    cancelled: list[bool] = []
    stalls: list[float] = []

    async def endless() -> AsyncIterator[int]:
        try:
            n = 0
            while True:
                await asyncio.sleep(0.01)
                n += 1
                yield n
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    frames = bridge.stream(
        endless, write_timeout=0.5, on_stall=lambda: stalls.append(time.monotonic())
    )
    took = [next(frames) for _ in range(3)]  # a consumer that keeps up is left alone
    time.sleep(0.2)
    next(frames)
    stuck_since = time.monotonic()
    time.sleep(1.5)  # "writing" this item for longer than the timeout

    assert took == [1, 2, 3]
    assert cancelled == [True]
    assert len(stalls) == 1 and 0.5 <= stalls[0] - stuck_since < 1.5
    frames.close()
