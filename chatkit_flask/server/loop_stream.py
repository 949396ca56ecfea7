"""A reply streamed by the event loop itself (server mode's ASGI worker).

Under a WSGI server every frame crosses from the loop to the thread that writes it
(:meth:`AsyncBridge.stream`). Under the ASGI worker the loop writes the frames: the view, in a
thread, only waits for the first one (so a missing thread is still a plain 404), and the
adapter (``server/asgi.py``) then iterates the rest on the loop. No thread is held while the
model talks, no frame crosses threads.

The producer still runs as its own task feeding a small bounded channel: the wait for the next
frame can then time out (a heartbeat during a silence, the idle timeout) without cancelling
the producer, and a slow client pauses the producer (the adapter awaits each send) instead of
buffering. Closing cancels the producer inside its current await, as the bridge does, and the
bridge's shutdown drain ends these streams too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from .bridge import _END, AsyncBridge, _Failure, _OpenStream, _pump

__all__ = ["LoopStream"]

log = logging.getLogger(__name__)


class _LoopChannel:
    """Producer-to-consumer hand-off on one loop, holding at most ``capacity`` items (plus the
    end, which always gets through)."""

    def __init__(self, capacity: int) -> None:
        self._items: asyncio.Queue[object] = asyncio.Queue()
        self._credits = asyncio.Semaphore(capacity)

    async def put(self, item: object) -> None:
        await self._credits.acquire()
        self._items.put_nowait(item)

    def put_final(self, item: object) -> None:
        self._items.put_nowait(item)

    async def get(self) -> object:
        item = await self._items.get()
        self._credits.release()
        return item


class LoopStream:
    """``agen_factory()`` run on the bridge's loop, read there by ``async for``.

    Build it in a thread, call :meth:`first` there (it starts the producer and returns its
    first item, or None when it ended without one; the producer's exception is raised), then
    iterate on the loop. With ``heartbeat``, ``heartbeat_item`` comes after that many silent
    seconds; ``idle_timeout`` bounds each wait (``TimeoutError``). :meth:`aclose` (on the loop)
    or :meth:`close` (in a thread) cancels the producer inside its await and waits up to the
    bridge's ``cancel_grace`` for its cleanup. When the bridge drains, the stream ends with
    ``drain_item()``.
    """

    def __init__(
        self,
        bridge: AsyncBridge,
        agen_factory: Callable[[], AsyncIterable[Any]],
        *,
        queue_size: int = 16,
        idle_timeout: float | None = None,
        heartbeat: float | None = None,
        heartbeat_item: Any = None,
        drain_item: Callable[[], Any] | None = None,
    ) -> None:
        if heartbeat is not None and heartbeat_item is None:
            raise ValueError("heartbeat needs a heartbeat_item")
        self._bridge = bridge
        self._factory = agen_factory
        self._queue_size = queue_size
        self._idle_timeout = idle_timeout
        self._heartbeat = heartbeat
        self._heartbeat_item = heartbeat_item
        self._drain_item = drain_item
        self._finished = threading.Event()  # the producer's cleanup has run
        self._task: asyncio.Task[None] | None = None
        self._channel: _LoopChannel | None = None
        self._open: _OpenStream | None = None
        self._ended = False  # the end or the failure was taken: nothing more will come

    # ------------------------------------------------------------ in a thread
    def first(self) -> Any | None:
        """Start the producer and wait (in this thread) for its first item."""
        return self._bridge.run(self._start, timeout=None)

    def close(self) -> None:
        """From a thread (a WSGI server closing the body): cancel the producer if it runs."""
        task = self._task
        if task is not None and not self._finished.is_set():
            self._bridge.loop.call_soon_threadsafe(task.cancel)
            if not self._finished.wait(self._bridge.cancel_grace):
                log.warning("stream producer still cleaning up after %ss",
                            self._bridge.cancel_grace)  # fmt: skip
        self._forget()

    # ---------------------------------------------------------------- on the loop
    async def _start(self) -> Any | None:
        self._channel = _LoopChannel(self._queue_size)
        self._open = _OpenStream(self._channel, self._drain_item)  # type: ignore[arg-type]
        with self._bridge._lock:
            self._bridge._streams.add(self._open)
        self._task = asyncio.ensure_future(
            _pump(self._factory, self._channel, self._finished, self._open)  # type: ignore[arg-type]
        )
        try:
            item = await self._next(heartbeats=False)
        except BaseException:
            self._forget()
            raise
        if item is _END:
            self._forget()
            return None
        return item

    async def _next(self, *, heartbeats: bool) -> Any:
        """The next item, ``_END``, or ``heartbeat_item`` after a silence; raises the
        producer's failure and ``TimeoutError`` after ``idle_timeout``."""
        assert self._channel is not None
        loop = asyncio.get_running_loop()
        deadline = None if self._idle_timeout is None else loop.time() + self._idle_timeout
        while True:
            wait = self._heartbeat if heartbeats else None
            if deadline is not None:
                left = max(0.0, deadline - loop.time())
                wait = left if wait is None else min(wait, left)
            try:
                async with asyncio.timeout(wait):
                    item = await self._channel.get()
                break
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    raise TimeoutError(f"no stream item within {self._idle_timeout}s") from None
                return self._heartbeat_item
        if item is _END:
            self._ended = True
        elif isinstance(item, _Failure):
            self._ended = True
            raise item.error
        return item

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while not self._ended:
                item = await self._next(heartbeats=self._heartbeat is not None)
                if item is _END:
                    return
                yield item
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """On the loop: cancel the producer if it still runs, and wait for its cleanup."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=self._bridge.cancel_grace)
            if not done:
                log.warning("stream producer still cleaning up after %ss",
                            self._bridge.cancel_grace)  # fmt: skip
        self._forget()

    def _forget(self) -> None:
        if self._open is not None:
            with self._bridge._lock:
                self._bridge._streams.discard(self._open)
