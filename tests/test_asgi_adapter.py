"""Server mode's ASGI adapter: a Flask app behind it behaves as under a WSGI server, and a body a
view hands over is written by the loop, cancelled when the client leaves or stops reading."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from flask import Flask, Response, request

from chatkit_flask.server.asgi import AsgiAdapter, hand_over


def scope(
    path: str = "/",
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    peer: tuple[str, int] = ("10.0.0.5", 5555),
) -> dict[str, Any]:
    return {
        "type": "http", "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
        "headers": headers or [], "client": peer, "server": ("127.0.0.1", 8000),
    }  # fmt: skip


class Client:
    """One request through the adapter: the body in ``chunks``, then waits; what was sent is
    recorded; ``leave()`` makes the next receive a disconnect."""

    def __init__(self, chunks: list[bytes] | None = None, *, stall_after: int | None = None):
        self._chunks = list(chunks or [b""])
        self.sent: list[dict[str, Any]] = []
        self._gone = asyncio.Event()
        self._stall_after = stall_after
        self.aborted = False
        self.transport = self  # what the adapter aborts for a stalled reader

    def abort(self) -> None:
        self.aborted = True

    def leave(self) -> None:
        self._gone.set()

    async def receive(self) -> dict[str, Any]:
        if self._chunks:
            body = self._chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(self._chunks)}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        bodies = [m for m in self.sent if m["type"] == "http.response.body"]
        if self._stall_after is not None and len(bodies) >= self._stall_after:
            await asyncio.Event().wait()  # a client that stopped reading: the send never ends
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


def run(adapter: AsgiAdapter, client: Client, **kwargs: Any) -> Client:
    asyncio.run(adapter(scope(**kwargs), client.receive, client.send))
    return client


def test_routes_see_the_request_as_under_a_wsgi_server() -> None:
    app = Flask(__name__)
    seen: dict[str, Any] = {}

    @app.post("/echo")
    def echo() -> Any:
        seen.update(
            scheme=request.scheme, remote=request.remote_addr, args=dict(request.args),
            cookie=request.headers.get("Cookie"), forwarded=request.headers.get("X-Forwarded-For"),
        )  # fmt: skip
        return {"got": request.get_json()}

    client = run(
        AsgiAdapter(app),
        Client([b'{"a": ', b"1}"]),  # the body in two pieces
        path="/echo",
        method="POST",
        query=b"x=1",
        headers=[
            (b"content-type", b"application/json"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            (b"x_forwarded_for", b"6.6.6.6"),  # would pass for X-Forwarded-For: dropped
        ],
    )
    assert client.status == 200
    assert client.body == b'{"got":{"a":1}}\n'
    assert seen == {"scheme": "http", "remote": "10.0.0.5", "args": {"x": "1"},
                    "cookie": "a=1; b=2", "forwarded": None}  # fmt: skip


def test_x_forwarded_proto_counts_only_from_an_allowed_proxy() -> None:
    app = Flask(__name__)
    app.add_url_rule("/", "scheme", lambda: request.scheme)
    proto = [(b"x-forwarded-proto", b"https")]
    adapter = AsgiAdapter(app, forwarded_allow=["10.0.0.5"])
    assert run(adapter, Client(), headers=proto).body == b"https"
    assert run(adapter, Client(), headers=proto, peer=("10.9.9.9", 1)).body == b"http"


def test_a_streamed_wsgi_body_goes_out_chunk_by_chunk_and_errors_are_500() -> None:
    app = Flask(__name__)
    app.add_url_rule("/parts", "parts", lambda: Response(iter([b"one", b"two"])))

    def boom() -> str:
        raise RuntimeError("boom")

    app.add_url_rule("/boom", "boom", boom)
    parts = run(AsgiAdapter(app), Client(), path="/parts")
    bodies = [m["body"] for m in parts.sent[1:]]
    assert bodies == [b"one", b"two", b""]
    assert run(AsgiAdapter(app), Client(), path="/boom").status == 500


class Reply:
    """A handed-over body: frames on the loop, as a ChatKit reply's."""

    def __init__(self, frames: int, gap: float = 0.0) -> None:
        self.frames, self.gap = frames, gap
        self.closed = asyncio.Event()
        self.wsgi_closed = threading.Event()
        self.loop_threads: set[int] = set()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for n in range(self.frames):
            self.loop_threads.add(threading.get_ident())
            await asyncio.sleep(self.gap)
            yield f"data: {n}\n\n".encode()

    async def aclose(self) -> None:
        self.closed.set()


def reply_app(reply: Reply, write_timeout: float | None = None) -> Flask:
    app = Flask(__name__)

    @app.post("/reply")
    def view() -> Response:
        response = Response(iter([b"never read"]), mimetype="text/event-stream")
        response.call_on_close(reply.wsgi_closed.set)
        assert hand_over(request.environ, reply, write_timeout)
        return response

    return app


def test_a_handed_over_body_is_written_by_the_loop_then_closed() -> None:
    reply = Reply(3)
    app = reply_app(reply)
    lines: list[tuple[str, int]] = []
    adapter = AsgiAdapter(
        app, access_log=lambda env, status, h, sent, t: lines.append((status, sent))
    )
    client = run(adapter, Client(), path="/reply", method="POST")
    assert client.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert client.headers[b"content-type"].startswith(b"text/event-stream")
    assert reply.loop_threads == {threading.main_thread().ident}  # not a pool thread
    assert reply.closed.is_set() and reply.wsgi_closed.is_set()  # the app's close callbacks ran
    assert lines == [("200 OK", len(client.body))]


def test_a_hang_up_closes_the_body_at_once() -> None:
    reply = Reply(1000, gap=0.01)
    app = reply_app(reply)
    client = Client()

    async def main() -> None:
        task = asyncio.ensure_future(
            AsgiAdapter(app)(scope("/reply", "POST"), client.receive, client.send)
        )
        while len(client.sent) < 3:
            await asyncio.sleep(0.01)
        client.leave()
        await asyncio.wait_for(task, 2)

    asyncio.run(main())
    assert reply.closed.is_set() and reply.wsgi_closed.is_set()
    assert len(client.sent) < 100  # stopped long before its 1000 frames
    assert not client.aborted


def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    reply = Reply(1000)
    app = reply_app(reply, write_timeout=0.2)
    client = Client(stall_after=5)

    async def main() -> None:
        await asyncio.wait_for(
            AsgiAdapter(app)(scope("/reply", "POST"), client.receive, client.send), 3
        )

    asyncio.run(main())
    assert client.aborted  # the connection is dropped, its buffer with it
    assert reply.closed.is_set() and reply.wsgi_closed.is_set()
