"""Server mode's ASGI face: the same Flask app, its replies written by the event loop.

Under server mode's gunicorn worker (``server/asgi_worker.py``) each process runs one asyncio
loop serving HTTP with uvicorn. Every request still goes to the Flask app (WSGI), in a thread
pool: identity, Flask-Limiter, the host's own routes, blueprints and extensions see a WSGI
request as under any WSGI server. A ChatKit reply's view hands its body over through the WSGI
environ (:func:`hand_over`) instead of returning frames for a thread to write, and the adapter
writes them from the loop that makes them: no thread is held while the model talks, no frame
crosses threads. The adapter also watches the client: a hang-up cancels the reply, a client
that stops reading is dropped after ``write_timeout`` (its connection aborted).

WSGI middleware that rewrites bodies does not see a handed-over reply (its headers still go
through the WSGI response).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

__all__ = ["ASYNC_BODY_KEY", "LOOP_KEY", "RECEIVED_KEY", "AsgiAdapter", "hand_over"]

log = logging.getLogger("chatkit_flask")

LOOP_KEY = "chatkit_flask.loop"  # the serving loop, in the environ of every request
RECEIVED_KEY = "chatkit_flask.received_at"  # perf_counter() when the request reached the loop
ASYNC_BODY_KEY = "chatkit_flask.async_body"  # (body, write_timeout) a view handed over
BUFFER_LIMIT = 1024 * 1024  # a response with a Content-Length up to this goes out in one piece

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AccessLog = Callable[[dict[str, Any], str, list[tuple[str, str]], int, float], None]


def hand_over(environ: dict[str, Any], body: Any, write_timeout: float | None) -> bool:
    """Let the adapter write ``body`` (an async iterable of bytes with ``aclose()``) from the
    loop. False when the request did not come through the adapter (a WSGI server iterates the
    response as usual)."""
    if LOOP_KEY not in environ:
        return False
    environ[ASYNC_BODY_KEY] = (body, write_timeout)
    return True


class _Stalled(Exception):
    """The client stopped reading."""


class AsgiAdapter:
    """An ASGI app serving the WSGI ``app`` from a pool of ``threads``.

    ``access_log(environ, status, headers, bytes_sent, seconds)`` is called once per response,
    in a thread. ``forwarded_allow`` lists the peers whose ``X-Forwarded-Proto`` sets the URL
    scheme (gunicorn's ``forwarded_allow_ips``; ``*`` trusts any).
    """

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        *,
        threads: int = 32,
        access_log: AccessLog | None = None,
        forwarded_allow: Iterable[str] = ("127.0.0.1", "::1"),
    ) -> None:
        self.app = app
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, "chatkit-wsgi")
        self._access_log = access_log
        self._forwarded_allow = frozenset(forwarded_allow)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.close", "code": 1003})
            return
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        first = await receive()
        environ = self._environ(scope, _input(first, receive, loop))
        environ[LOOP_KEY] = loop
        environ[RECEIVED_KEY] = started
        reply = await loop.run_in_executor(self.pool, self._call_app, environ, send, loop)
        if reply is None:
            return  # written from the thread
        status, headers, body = reply
        if isinstance(body, bytes):
            await _start(send, status, headers)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        app_iter, (async_body, write_timeout) = body
        await _start(send, status, headers)
        sent = 0
        try:
            sent = await self._stream(async_body, write_timeout, receive, send)
        finally:
            await loop.run_in_executor(
                self.pool, self._finish, app_iter, environ, status, headers, sent, started
            )

    # ------------------------------------------------------------------ the WSGI side
    def _call_app(
        self, environ: dict[str, Any], send: Send, loop: asyncio.AbstractEventLoop
    ) -> tuple[str, list[tuple[str, str]], Any] | None:
        """In a pool thread: run the app. Returns what the loop writes (the whole body, or a
        handed-over one), or None after writing a streamed WSGI body from here."""
        started = time.perf_counter()
        response: dict[str, Any] = {}

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            if exc_info is not None and response.get("started"):
                raise exc_info[1].with_traceback(exc_info[2])
            response["status"], response["headers"] = status, headers
            return _no_write

        try:
            app_iter = self.app(environ, start_response)
        except Exception:
            log.exception("chatkit_flask: the app raised")
            app_iter = [b"Internal Server Error"]
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        handed = environ.get(ASYNC_BODY_KEY)
        if handed is not None:
            return response["status"], response["headers"], (app_iter, handed)
        status, headers = response["status"], response["headers"]
        length = _content_length(headers)
        if length is not None and length <= BUFFER_LIMIT:
            try:
                body = b"".join(app_iter)
            finally:
                _close(app_iter)
            self._log(environ, status, headers, len(body), started)
            return status, headers, body
        self._write_from_thread(app_iter, status, headers, environ, send, loop, started)
        return None

    def _write_from_thread(
        self,
        app_iter: Iterable[bytes],
        status: str,
        headers: list[tuple[str, str]],
        environ: dict[str, Any],
        send: Send,
        loop: asyncio.AbstractEventLoop,
        started: float,
    ) -> None:
        """A large or streamed WSGI body, chunk by chunk, each send awaited (back-pressure)."""
        sent = 0

        def run(coro: Awaitable[None]) -> None:
            asyncio.run_coroutine_threadsafe(coro, loop).result()  # type: ignore[arg-type]

        try:
            run(_start(send, status, headers))
            for chunk in app_iter:
                if chunk:
                    run(send({"type": "http.response.body", "body": chunk, "more_body": True}))
                    sent += len(chunk)
                if _gone(send):
                    return  # uvicorn drops what is sent after a hang-up: stop producing
            run(send({"type": "http.response.body", "body": b"", "more_body": False}))
        finally:
            self._log(environ, status, headers, sent, started)
            _close(app_iter)

    def _finish(
        self,
        app_iter: Iterable[bytes],
        environ: dict[str, Any],
        status: str,
        headers: list[tuple[str, str]],
        sent: int,
        started: float,
    ) -> None:
        """In a thread, after a handed-over body ended: the access line, then the WSGI close
        (the app's close callbacks: the reply's log line, its slots)."""
        self._log(environ, status, headers, sent, started)
        _close(app_iter)

    def _log(
        self,
        environ: dict[str, Any],
        status: str,
        headers: list[tuple[str, str]],
        sent: int,
        started: float,
    ) -> None:
        if self._access_log is not None:
            try:
                self._access_log(environ, status, headers, sent, time.perf_counter() - started)
            except Exception:  # a log line must never break a response
                log.debug("access log failed", exc_info=True)

    # ------------------------------------------------------------------ the loop side
    async def _stream(
        self, body: Any, write_timeout: float | None, receive: Receive, send: Send
    ) -> int:
        """Write ``body`` from the loop until it ends, the client leaves or stops reading;
        returns the bytes sent. The body is closed however it ends (cancelling the reply)."""
        sent = [0]
        writer = asyncio.ensure_future(_write(body, write_timeout, send, sent))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, watcher):
                task.cancel()
            await asyncio.wait({writer, watcher})
            try:
                await body.aclose()
            except Exception as exc:  # the reply is over either way
                log.debug("closing a reply failed: %r", exc)
        if writer.done() and not writer.cancelled():
            error = writer.exception()
            if isinstance(error, _Stalled):
                log.warning("chatkit_flask: stream reader stalled for %ss: dropping it",
                            write_timeout)  # fmt: skip
                _abort(send)
            elif error is not None:
                log.error("chatkit_flask: a reply failed mid-stream: %s", type(error).__name__)
                _abort(send)
        return sent[0]

    def _environ(self, scope: Scope, body: io.BufferedReader) -> dict[str, Any]:
        root = scope.get("root_path", "")
        path = scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :]
        query = scope.get("query_string", b"").decode("latin-1")
        raw_path = scope.get("raw_path") or scope["path"].encode()
        client = scope.get("client") or ("", 0)
        server = scope.get("server") or ("localhost", 80)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": scope["method"],
            "SCRIPT_NAME": root.encode().decode("latin-1"),
            "PATH_INFO": path.encode().decode("latin-1"),
            "QUERY_STRING": query,
            "RAW_URI": raw_path.decode("latin-1") + (f"?{query}" if query else ""),
            "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
            "SERVER_NAME": str(server[0]),
            "SERVER_PORT": str(server[1]),
            "REMOTE_ADDR": str(client[0]),
            "REMOTE_PORT": str(client[1]),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scope.get("scheme", "http"),
            "wsgi.input": body,
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.decode("latin-1").upper()
            if "_" in name:
                # Dropped, as gunicorn does: X_Forwarded_For would otherwise pass for
                # X-Forwarded-For (both become HTTP_X_FORWARDED_FOR).
                continue
            value = raw_value.decode("latin-1")
            key = name.replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            if key in environ:
                value = environ[key] + ("; " if key == "HTTP_COOKIE" else ",") + value
            environ[key] = value
        proto = environ.get("HTTP_X_FORWARDED_PROTO", "").lower()
        if proto in ("http", "https") and (
            "*" in self._forwarded_allow or environ["REMOTE_ADDR"] in self._forwarded_allow
        ):
            environ["wsgi.url_scheme"] = proto
        return environ


async def _start(send: Send, status: str, headers: list[tuple[str, str]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": int(status.split(" ", 1)[0]),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        }
    )


async def _write(body: Any, timeout: float | None, send: Send, sent: list[int]) -> None:
    async for chunk in body:
        try:
            async with asyncio.timeout(timeout):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TimeoutError:
            raise _Stalled from None
        sent[0] += len(chunk)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # the rest of a body the app did not read


def _abort(send: Send) -> None:
    """Drop the connection without flushing (a stalled reader's buffer would wait forever).
    uvicorn's ``send`` is a method of its request cycle, which holds the transport."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None:
        transport.abort()


def _gone(send: Send) -> bool:
    """Whether the client hung up (uvicorn's request cycle knows; other servers: never)."""
    return bool(getattr(getattr(send, "__self__", None), "disconnected", False))


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _close(app_iter: Any) -> None:
    close = getattr(app_iter, "close", None)
    if close is not None:
        close()


def _no_write(data: bytes) -> None:
    raise NotImplementedError("the WSGI write() callable is not supported; return a body")


class _Receiver(io.RawIOBase):
    """``wsgi.input``: the request body as the app reads it, pulled from the loop."""

    def __init__(self, first: Message, receive: Receive, loop: asyncio.AbstractEventLoop) -> None:
        self._buffer = bytearray(first.get("body", b""))
        self._more = bool(first.get("more_body", False))
        self._receive = receive
        self._loop = loop

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer and self._more:
            message = asyncio.run_coroutine_threadsafe(self._receive(), self._loop).result()
            if message["type"] != "http.request":
                self._more = False  # the client left: a short body
                break
            self._buffer += message.get("body", b"")
            self._more = bool(message.get("more_body", False))
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        del self._buffer[:count]
        return count


def _input(first: Message, receive: Receive, loop: asyncio.AbstractEventLoop) -> io.BufferedReader:
    return io.BufferedReader(_Receiver(first, receive, loop), 64 * 1024)
