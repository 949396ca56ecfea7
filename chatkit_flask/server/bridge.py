"""The one place where synchronous WSGI threads meet asyncio.

The ChatKit and Agents SDKs are async only, and the clients they use (``AsyncOpenAI``,
``redis.asyncio``) are bound to the event loop they were first used on. Flask ``async def`` views
get a new loop per request, so those clients break on the second request. Instead each worker
process runs ONE event loop in a daemon thread, started on first use and started again after a
fork; views hand it work through :class:`AsyncBridge` and stay synchronous. Work reaches the
loop without the calling thread's context variables (no Flask context leaks onto the loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["AsyncBridge", "LoopLocal", "drain_all"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_END = object()  # the producer finished normally


class _Failure:
    """The producer raised; the consumer re-raises ``error`` in its own thread."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class AsyncBridge:
    """One background event loop per worker process, driven from WSGI threads.

    Callers may rely on: the loop starts lazily and is re-created after ``fork`` (the parent's
    thread does not exist in a child); factories are called ON the loop, so loop-bound objects
    they create are safe; calling :meth:`run` or :meth:`stream` from the loop thread itself raises
    ``RuntimeError`` (it would deadlock).
    """

    def __init__(self, *, name: str = "chatkit-async", cancel_grace: float = 2.0) -> None:
        self.name = name
        self.cancel_grace = cancel_grace
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._streams: set[_OpenStream] = set()  # guarded by _lock
        self._adopted = False  # the loop is an ASGI server's, not ours to stop
        self.draining = False
        self._ending: set[asyncio.Future[None]] = set()
        _BRIDGES.add(self)

    # ----------------------------------------------------------------- the loop
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """This process's loop, started if needed."""
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            if self._pid != os.getpid() or self._loop is None or not alive:
                self._start_locked()
            assert self._loop is not None
            return self._loop

    def uses(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether ``loop`` is this process's loop already (cheap: checked per request)."""
        return self._loop is loop and self._pid == os.getpid()

    def adopt(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        cleanup: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run on ``loop`` from now on: a running loop an ASGI server owns (server mode's
        gunicorn worker), so streams are written by the loop that makes them. The loop this
        bridge started, if any, is closed first (``cleanup`` runs on it, as in :meth:`close`);
        loop-bound clients are made again on the new loop (:class:`LoopLocal`). The adopted loop
        is never stopped by :meth:`close`. Call from a thread other than ``loop``'s."""
        if self.uses(loop):
            return
        self.close(cleanup=cleanup)
        thread_id = concurrent.futures.Future[int]()
        loop.call_soon_threadsafe(lambda: thread_id.set_result(threading.get_ident()))
        ident = thread_id.result(5.0)
        with self._lock:
            self._pid, self._loop, self._adopted = os.getpid(), loop, True
            self._thread = next((t for t in threading.enumerate() if t.ident == ident), None)

    def _start_locked(self) -> None:
        # After a fork the old loop object is inherited but its thread is not: abandon it
        # (closing it could touch state the parent still uses) and start afresh.
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=serve, name=self.name, daemon=True)
        thread.start()
        ready.wait()
        self._pid, self._loop, self._thread = os.getpid(), loop, thread

    def in_loop_thread(self) -> bool:
        """True when called from this process's loop thread."""
        thread = self._thread
        return (
            thread is not None
            and self._pid == os.getpid()
            and thread.ident == threading.get_ident()
        )

    def _refuse_loop_thread(self) -> None:
        if self.in_loop_thread():
            raise RuntimeError(
                "AsyncBridge called from its own event loop thread: this would deadlock. "
                "Await the coroutine directly instead."
            )

    def close(
        self, timeout: float = 5.0, *, cleanup: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Stop this process's loop and its worker threads (``asyncio.to_thread``); the next
        call starts a new loop. ``cleanup()`` runs on the loop first (closing loop-bound
        clients); its errors are logged, never raised. Does nothing when no loop runs."""
        self._refuse_loop_thread()
        with self._lock:
            loop, thread, adopted = self._loop, self._thread, self._adopted
            self._pid = self._loop = self._thread = None
            self._adopted = False
        if loop is None or thread is None or not thread.is_alive():
            return
        if adopted:  # the server's loop: its clients are closed with it, at the process's end
            return

        async def finish() -> None:
            try:
                if cleanup is not None:
                    await cleanup()
            finally:
                await loop.shutdown_default_executor()

        try:
            asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout)
        except Exception as exc:  # closing must go on: the loop is stopped below regardless
            log.warning("event loop cleanup failed: %s", type(exc).__name__)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()

    def drain(self, after: float) -> None:
        """Shutting down: from now on :attr:`draining` is true (callers refuse new work), and
        ``after`` seconds from now every stream still open is ended: its producer is cancelled
        inside its await (so its own cancellation handling runs: ChatKit keeps the partial
        answer), then its ``drain_item`` goes out and the stream ends. Safe from a signal
        handler."""
        self.draining = True
        with self._lock:
            loop = self._loop if self._pid == os.getpid() else None
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.call_later, after, self._end_streams)

    def _end_streams(self) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            ending = asyncio.ensure_future(stream.end())
            self._ending.add(ending)  # held until done (the loop keeps only weak references)
            ending.add_done_callback(self._ending.discard)

    # --------------------------------------------------------------- requests
    def run(self, coro_factory: Callable[[], Awaitable[T]], timeout: float | None) -> T:
        """Run ``coro_factory()`` on the loop and return its result (or raise its exception).

        On ``timeout`` the coroutine is cancelled and ``TimeoutError`` is raised.
        """
        self._refuse_loop_thread()

        async def call() -> T:
            return await coro_factory()

        future = _submit(call(), self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"bridge call did not finish within {timeout}s") from None

    def stream(
        self,
        agen_factory: Callable[[], AsyncIterable[T]],
        *,
        queue_size: int = 64,
        idle_timeout: float | None = None,
        heartbeat: float | None = None,
        heartbeat_item: T | None = None,
        write_timeout: float | None = None,
        on_stall: Callable[[], None] | None = None,
        drain_item: Callable[[], T] | None = None,
    ) -> Iterator[T]:
        """Relay ``agen_factory()`` (run on the loop) to the calling thread, item by item.

        Nothing starts until the first ``next()``. A bounded queue gives back-pressure: a slow
        consumer pauses the producer (and so the model stream) instead of buffering. Exceptions
        from the producer are raised in the consumer. Closing the returned generator (gunicorn
        does when the client goes away) cancels the producer INSIDE its current await, so its
        own cancellation handling runs, and waits up to ``cancel_grace`` seconds for it.
        ``idle_timeout`` bounds the wait for each item (``TimeoutError``). With ``heartbeat``,
        ``heartbeat_item`` is yielded after that many silent seconds: a write lets the server
        notice a client that left during a long silence. With ``write_timeout``, a consumer that
        has not come back for the next item that long after taking one (the server is stuck
        writing to a client that does not read) is given up on: ``on_stall`` runs on the loop
        (it should unblock the write, e.g. shut the socket down) and the producer is cancelled,
        so a reader that stalls holds neither the model call nor more memory. When the bridge
        is drained (:meth:`drain`), an open stream ends with ``drain_item()`` (made on the loop).
        """
        self._refuse_loop_thread()
        if heartbeat is not None and heartbeat_item is None:
            raise ValueError("heartbeat needs a heartbeat_item")
        watch = None if write_timeout is None else _WriteWatch(write_timeout, on_stall)
        return self._stream(
            agen_factory, queue_size, idle_timeout, heartbeat, heartbeat_item, watch, drain_item
        )

    def _stream(
        self,
        agen_factory: Callable[[], AsyncIterable[T]],
        queue_size: int,
        idle_timeout: float | None,
        heartbeat: float | None,
        heartbeat_item: T | None,
        watch: _WriteWatch | None,
        drain_item: Callable[[], T] | None,
    ) -> Iterator[T]:
        loop = self.loop
        channel = _Channel(loop, queue_size)
        finished = threading.Event()
        open_stream = _OpenStream(channel, drain_item)
        with self._lock:
            self._streams.add(open_stream)
        task_future = _submit(_pump(agen_factory, channel, finished, open_stream), loop)
        if watch is not None:
            watch.start(loop, task_future)
        completed = False
        try:
            while True:
                deadline = None if idle_timeout is None else time.monotonic() + idle_timeout
                while True:
                    wait = heartbeat
                    if deadline is not None:
                        left = max(0.0, deadline - time.monotonic())
                        wait = left if wait is None else min(wait, left)
                    try:
                        item = channel.get(wait)
                        break
                    except queue.Empty:
                        if deadline is not None and time.monotonic() >= deadline:
                            raise TimeoutError(f"no stream item within {idle_timeout}s") from None
                        yield from _watched(heartbeat_item, watch)  # type: ignore[arg-type]
                if item is _END:
                    completed = True
                    return
                if isinstance(item, _Failure):
                    completed = True
                    raise item.error
                yield from _watched(item, watch)  # type: ignore[arg-type]
        finally:
            with self._lock:
                self._streams.discard(open_stream)
            if watch is not None:
                watch.done = True
            if not completed:
                # Cancelling the concurrent future cancels the loop task; wait on our own event
                # because the future reports "cancelled" at once, before cleanup has run.
                task_future.cancel()
                if not finished.wait(self.cancel_grace):
                    log.warning("stream producer still cleaning up after %ss", self.cancel_grace)


class _OpenStream:
    """What :meth:`AsyncBridge.drain` needs of one open stream."""

    def __init__(self, channel: _Channel, drain_item: Callable[[], object] | None) -> None:
        self.channel = channel
        self.drain_item = drain_item
        self.task: asyncio.Task[None] | None = None  # the pump, once it runs

    async def end(self) -> None:
        """On the loop: cancel the producer, wait for its cleanup, send the last item, end."""
        task = self.task
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.wait({task})
        if self.drain_item is not None:
            try:
                self.channel.put_final(self.drain_item())
            except Exception as exc:  # the stream still ends
                log.debug("drain_item failed: %r", exc)
        self.channel.put_final(_END)


_BRIDGES: weakref.WeakSet[AsyncBridge] = weakref.WeakSet()


def drain_all(after: float) -> None:
    """:meth:`AsyncBridge.drain` on every bridge of this process (a server's shutdown hook)."""
    for bridge in list(_BRIDGES):
        bridge.drain(after)


class _WriteWatch:
    """Notices a consumer stuck on one item (its server writing to a client that does not read).

    The consumer thread sets ``since`` while an item is out; a check on the loop every quarter
    of ``timeout`` (at most a second apart) compares. Plain attributes: each is written by one
    thread and read by the other, and a stale read only delays the check by one round.
    """

    def __init__(self, timeout: float, on_stall: Callable[[], None] | None) -> None:
        self.timeout = timeout
        self.on_stall = on_stall
        self.since: float | None = None
        self.done = False
        self.stalled = False

    def start(
        self, loop: asyncio.AbstractEventLoop, producer: concurrent.futures.Future[None]
    ) -> None:
        every = min(1.0, self.timeout / 4)

        def check() -> None:
            if self.done:
                return
            since = self.since
            if since is not None and time.monotonic() - since > self.timeout:
                self.stalled = True
                log.warning("stream reader stalled for %ss: dropping it", self.timeout)
                if self.on_stall is not None:
                    try:
                        self.on_stall()
                    except Exception as exc:  # the producer is cancelled anyway
                        log.debug("on_stall failed: %r", exc)
                producer.cancel()
                return
            loop.call_later(every, check)

        loop.call_soon_threadsafe(loop.call_later, every, check)


def _watched(item: T, watch: _WriteWatch | None) -> Iterator[T]:
    """Yield ``item``, telling ``watch`` how long the consumer is away with it."""
    if watch is None:
        yield item
        return
    watch.since = time.monotonic()
    try:
        yield item
    finally:
        watch.since = None
def _submit(
    coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop
) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on ``loop`` in an EMPTY context. ``run_coroutine_threadsafe`` would
    copy the calling thread's context variables into the task: Flask's request and app
    contexts, which the view pops while the task still runs (site code would see a stale
    ``request`` and an app context whose teardown never runs for it)."""
    return contextvars.Context().run(asyncio.run_coroutine_threadsafe, coro, loop)


class _Channel:
    """Loop-to-thread hand-off holding at most ``capacity`` items.

    Items cross in a thread-safe queue the consumer blocks on (no task or future per item: a
    per-item ``run_coroutine_threadsafe`` cost about 180 us of CPU per model delta); the
    consumer hands credits back to the loop in batches.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._credits = asyncio.Semaphore(capacity)
        self._loop = loop
        self._return_every = max(1, capacity // 2)
        self._taken = 0  # consumer thread only

    async def put(self, item: object) -> None:
        """On the loop: wait for room, then hand ``item`` over."""
        await self._credits.acquire()
        self._items.put(item)

    def put_final(self, item: object) -> None:
        """On the loop: the end or a failure, which must get through even when full."""
        self._items.put(item)

    def get(self, timeout: float | None) -> object:
        """In the consumer thread: the next item (``queue.Empty`` after ``timeout``)."""
        item = self._items.get(timeout=timeout)
        self._taken += 1
        if self._taken >= self._return_every:
            taken, self._taken = self._taken, 0
            self._loop.call_soon_threadsafe(self._release, taken)
        return item

    def _release(self, count: int) -> None:
        for _ in range(count):
            self._credits.release()


async def _pump(
    agen_factory: Callable[[], AsyncIterable[T]],
    channel: _Channel,
    finished: threading.Event,
    open_stream: _OpenStream,
) -> None:
    open_stream.task = asyncio.current_task()
    agen = None
    try:
        agen = aiter(agen_factory())
        while True:
            try:
                item = await anext(agen)
            except StopAsyncIteration:
                break
            try:
                await channel.put(item)
            except asyncio.CancelledError:
                # Cancelled while the channel was full: the generator is parked at a `yield`,
                # where a thrown exception would not reach the generators nested inside it
                # (their cleanup would only run at garbage collection, as GeneratorExit).
                await _cancel_inside(agen)
                raise
        channel.put_final(_END)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        channel.put_final(_Failure(exc))
    finally:
        if agen is not None and hasattr(agen, "aclose"):
            try:
                await agen.aclose()  # type: ignore[attr-defined]
            except BaseException as exc:  # cleanup must not mask the outcome
                log.debug("stream producer aclose failed: %r", exc)
        finished.set()


async def _cancel_inside(agen: object) -> None:
    """Advance ``agen`` to its next real await and cancel it there."""
    while True:
        step = asyncio.ensure_future(anext(agen))  # type: ignore[call-overload]
        await asyncio.sleep(0)  # let the step start; its first suspension is inside agen
        step.cancel()
        try:
            await step
        except (asyncio.CancelledError, StopAsyncIteration):
            return
        except Exception:  # its own error ends it as surely as a cancellation
            return
        # It produced another item before reaching an await: drop it and try again.


class LoopLocal(Generic[T]):
    """A value made by ``factory`` once per event loop (so once per process with the bridge).

    For clients bound to a loop (``AsyncOpenAI``, ``redis.asyncio``). :meth:`get` must be called
    on a running loop; a new loop (a new process after fork, a new bridge) gets a new value.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def peek(self) -> T | None:
        """The running loop's value, or None when none was made (makes nothing)."""
        return self._values.get(asyncio.get_running_loop())

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        try:
            return self._values[loop]
        except KeyError:
            value = self._factory()
            self._values[loop] = value
            return value
