"""What the fake APIs share: an asyncio HTTP server on a loopback socket, run from a thread.

:class:`LoopbackServer` owns the lifecycle (``start``/``stop``, context manager, ``port``),
the connection tracking that lets ``stop()`` abort whatever is still open, and the
thread-safe record of what arrived (``requests``, ``count``, ``connections``, ``wait_for``).
A fake subclasses it and implements :meth:`LoopbackServer._serve_one`; parsing and answering
stay with each fake because each mimics its own upstream's quirks.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self

MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received by the fake (headers have lower-case keys)."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any | None
    raw_body: bytes


class ClientGone(Exception):
    """Raised by a handler to end its connection quietly (the client went away)."""


class LoopbackServer:
    """Base of the fakes; every public method is thread-safe.

    ``_cond`` guards all recorded and scripted state. It is a ``threading.Condition`` over an
    ``RLock``, so a subclass may call ``super().clear()`` while holding it and clear its own
    state in the same critical section.
    """

    _thread_name: ClassVar[str]  # name of the serving thread, e.g. "fake-chatkit"
    _log_name: ClassVar[str]  # prefix of stderr messages, e.g. "fake_chatkit"

    def __init__(self, host: str, port: int, *, max_history: int) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._max_history = max_history
        self._cond = threading.Condition()
        self._records: deque[RecordedRequest] = deque(maxlen=max_history)
        self._count = 0
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False

    # ----------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        """The bound TCP port (valid after ``start()``)."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    def start(self) -> Self:
        """Bind and serve from a daemon thread; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run_thread, args=(ready, failure), name=self._thread_name, daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every open connection, then stop the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        # Best effort: stop() runs from test teardown, where a second error would only hide
        # the first; the loop is stopped and the thread joined whatever happens.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run_thread(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._bind())
        except BaseException as exc:  # handed to start(), which raises it in the caller
            failure.append(exc)
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _bind(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._handle_conn,
            self.host,
            self._requested_port,
            limit=MAX_HEAD_BYTES,  # a longer request head fails readuntil() instead of growing
            backlog=1024,  # the benchmark opens connections in bursts
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        # Abort rather than close: a handler may be parked forever (a scripted hang), and
        # a test's teardown must not wait for a client that never reads.
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._conns.items()):
            writer.transport.abort()
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` without a trailing slash (wildcard hosts map to loopback)."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # noqa: S104
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------- recording API
    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests (oldest first, at most ``max_history``)."""
        with self._cond:
            return list(self._records)

    @property
    def count(self) -> int:
        """Number of requests received since construction or the last ``clear()``."""
        with self._cond:
            return self._count

    @property
    def connections(self) -> int:
        """Number of TCP connections accepted since construction or the last ``clear()``."""
        with self._cond:
            return self._connections

    def wait_for(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``n`` requests were received; return the snapshot.

        Raises ``TimeoutError`` if that does not happen within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._count >= n, timeout):
                raise TimeoutError(f"expected {n} requests, got {self._count} after {timeout}s")
            return list(self._records)

    def clear(self) -> None:
        """Forget recorded requests and reset ``count`` and ``connections``."""
        with self._cond:
            self._records.clear()
            self._count = 0
            self._connections = 0

    def _record(self, request: RecordedRequest) -> None:
        with self._cond:
            self._records.append(request)
            self._count += 1
            self._cond.notify_all()

    # ---------------------------------------------------------------- HTTP layer
    async def _handle_conn(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing:
            writer.transport.abort()
            return
        self._conns[task] = writer
        with self._cond:
            self._connections += 1
        try:
            while await self._serve_one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError, ClientGone):
            pass
        except Exception as exc:  # pragma: no cover - defensive: never kill the loop
            print(f"{self._log_name}: internal error: {exc!r}", file=sys.stderr)
        finally:
            self._conns.pop(task, None)
            if self._closing:
                writer.transport.abort()
            else:
                writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read and answer one request; return False when the connection must be closed."""
        raise NotImplementedError


async def serve_until_signalled(server: LoopbackServer, label: str) -> int:
    """Serve ``server`` on the running loop until SIGINT/SIGTERM (the CLIs); 1 if it cannot bind."""
    try:
        await server._bind()
    except OSError as exc:
        where = f"{server.host}:{server._requested_port}"
        print(f"{label}: cannot bind {where}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"{label} listening on {server.base_url}", flush=True)
    await stop.wait()
    await server._shutdown()
    return 0
