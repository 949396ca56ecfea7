"""A reply streamed by the loop itself (the ASGI worker's path): the first frame awaited from a
thread, the rest on the loop, with heartbeats, cancellation inside the producer and the drain."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from chatkit_flask.server.bridge import AsyncBridge
from chatkit_flask.server.loop_stream import LoopStream


@pytest.fixture
def bridge() -> Iterator[AsyncBridge]:
    bridge = AsyncBridge(name="test-loop-stream")
    yield bridge
    bridge.close()


def on_loop(bridge: AsyncBridge, stream: LoopStream, limit: int | None = None) -> list[Any]:
    """The rest of ``stream``, read by the loop (``limit`` items, then closed)."""

    async def read() -> list[Any]:
        items = []
        async for item in stream:
            items.append(item)
            if limit is not None and len(items) >= limit:
                await stream.aclose()
                break
        return items

    return bridge.run(read, timeout=10)


def test_first_frame_from_the_thread_the_rest_on_the_loop(bridge: AsyncBridge) -> None:
    threads: list[int] = []

    async def frames() -> AsyncIterator[str]:
        for n in range(4):
            threads.append(threading.get_ident())
            yield f"frame {n}"

    stream = LoopStream(bridge, frames)
    assert stream.first() == "frame 0"
    assert on_loop(bridge, stream) == ["frame 1", "frame 2", "frame 3"]
    assert bridge._thread is not None and set(threads) == {bridge._thread.ident}
    assert not bridge._streams  # forgotten once ended


def test_errors_before_the_first_frame_reach_the_thread(bridge: AsyncBridge) -> None:
    async def missing() -> AsyncIterator[str]:
        raise LookupError("no such thread")
        yield ""  # pragma: no cover

    async def nothing() -> AsyncIterator[str]:
        return
        yield ""  # pragma: no cover

    with pytest.raises(LookupError):
        LoopStream(bridge, missing).first()
    assert LoopStream(bridge, nothing).first() is None
    assert not bridge._streams


def test_heartbeats_fill_silences_without_disturbing_the_producer(bridge: AsyncBridge) -> None:
    async def slow() -> AsyncIterator[str]:
        yield "start"
        await asyncio.sleep(0.35)
        yield "late"

    stream = LoopStream(bridge, slow, heartbeat=0.1, heartbeat_item="beat")
    assert stream.first() == "start"
    rest = on_loop(bridge, stream)
    assert rest[-1] == "late" and 2 <= rest.count("beat") <= 4


def test_closing_cancels_inside_the_producer(bridge: AsyncBridge) -> None:
    cleaned = threading.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                await asyncio.sleep(0.01)
                yield "word"
        except asyncio.CancelledError:
            cleaned.set()  # the SDK keeps the partial answer here
            raise

    stream = LoopStream(bridge, endless)
    stream.first()
    assert on_loop(bridge, stream, limit=3) == ["word"] * 3
    assert cleaned.wait(2)
    assert not bridge._streams


def test_a_stream_never_read_is_cancelled_by_the_wsgi_close(bridge: AsyncBridge) -> None:
    cleaned = threading.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                yield "word"
                await asyncio.sleep(0.01)
        finally:
            cleaned.set()

    stream = LoopStream(bridge, endless)
    stream.first()
    stream.close()  # from this thread, as a server that never iterated the body would
    assert cleaned.wait(2)


def test_the_drain_ends_an_open_stream_with_its_last_frame(bridge: AsyncBridge) -> None:
    async def endless() -> AsyncIterator[str]:
        while True:
            await asyncio.sleep(0.02)
            yield "word"

    stream = LoopStream(bridge, endless, drain_item=lambda: "restarting")
    stream.first()
    bridge.drain(after=0.1)
    rest = on_loop(bridge, stream)
    assert rest[-1] == "restarting" and set(rest[:-1]) <= {"word"}
    assert bridge.draining


def test_adopting_a_running_loop_moves_the_work_onto_it() -> None:
    bridge = AsyncBridge(name="test-adopt")
    own = bridge.loop  # the bridge's own thread, as after the start-up probe
    closed = threading.Event()
    serving = asyncio.new_event_loop()
    server = threading.Thread(target=serving.run_forever, daemon=True)
    server.start()
    try:

        async def cleanup() -> None:
            closed.set()

        bridge.adopt(serving, cleanup=cleanup)
        assert closed.is_set() and own.is_closed()  # its own loop's clients were closed
        assert bridge.uses(serving)

        async def where() -> int:
            return threading.get_ident()

        assert bridge.run(where, timeout=2) == server.ident
        bridge.close()  # never stops a loop it adopted
        assert serving.is_running()
    finally:
        serving.call_soon_threadsafe(serving.stop)
        server.join(2)
        serving.close()
