"""Chat visitors for bench/server.py, on raw asyncio sockets (stdlib only, cheap per event).

A :class:`Visitor` is one browser tab: its own keep-alive connection, its own cookies (any
``Set-Cookie`` is kept), its own ``X-Forwarded-For`` address if asked (behind a trusted proxy,
per-IP limits then see many clients), the target's ``Origin``. It creates a thread, adds messages
to it, and starts a new thread every ``messages_per_thread`` messages, reading every event
stream to its end. A :class:`ModelCaller` sends the same messages straight to the fake model:
the floor that "added" time to first delta is measured against.

Per message: time to the response headers, to the first text delta, to the end; ``ok`` when the
answer ended as it should (status 200, a delta, then the end marker, no ``error`` event).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ModelCaller", "Result", "Visitor", "closed_loop", "percentile"]

now = time.monotonic
ERROR_MARKERS = (b'"type":"error"', b'"type": "error"')
_addresses = itertools.count(1)


@dataclass
class Result:
    kind: str  # create, add, model
    started: float = 0.0
    status: int = 0
    headers_s: float | None = None
    first_delta_s: float | None = None
    total_s: float | None = None
    ok: bool = False
    error: str = ""


class Caller(Protocol):
    async def message(self, result: Result | None = None) -> Result: ...
    async def close(self) -> None: ...


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank ``p``-th percentile (0-100); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * p // 100) - 1))]


class _Connection:
    """One keep-alive HTTP/1.1 connection; POSTs and reads an event stream with few awaits."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.cookies: dict[str, str] = {}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(
        self,
        path: str,
        body: bytes,
        r: Result,
        delta: bytes,
        done: bytes,
        timeout: float,
        want: bytes = b"",
    ) -> bytes:
        """Send one POST, fill ``r``; return the first event holding ``want`` (if any)."""
        r.started = now()  # a new connection's set-up counts, as a browser's does
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n{self.headers}"
            + (f"Cookie: {cookie}\r\n" if cookie else "")
            + f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        r.headers_s = now() - r.started
        r.status = int(raw[9:12])
        lines = raw.decode("latin-1").split("\r\n")
        chunked, length, keep = False, 0, True
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "set-cookie":
                key, _, val = value.split(";", 1)[0].partition("=")
                self.cookies[key] = val
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "content-length":
                length = int(value)
            elif name == "connection" and value.lower() == "close":
                keep = False
        found = b""
        errored = seen_done = False
        ended = not chunked  # a chunked body ends with its last chunk, not a hang-up
        if not chunked:
            await asyncio.wait_for(self.reader.readexactly(length), timeout)
        else:
            # Raw chunked bytes, not decoded: markers are searched in what arrived plus a tail
            # of the previous read (a marker split across reads is still seen).
            tail = acc = b""
            keep_tail = max(len(delta), len(done), 16)
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    keep = False
                    break
                seen = tail + data
                if r.first_delta_s is None and delta in seen:
                    r.first_delta_s = now() - r.started
                if r.first_delta_s is not None and done in seen:
                    seen_done = True
                if any(m in seen for m in ERROR_MARKERS):
                    errored = True
                if want and not found:  # thread.created comes first: a short wait
                    acc += data
                    found = _event_with(acc, want)
                if seen.endswith(b"\r\n0\r\n\r\n") or seen == b"0\r\n\r\n":
                    ended = True
                    break
                tail = seen[-keep_tail:]
        r.total_s = now() - r.started
        if not keep:
            self.close()
        r.ok = r.status == 200 and seen_done and ended and not errored
        if not r.ok:
            r.error = (
                f"http_{r.status}"
                if r.status != 200
                else "error_event"
                if errored
                else "no_delta"
                if r.first_delta_s is None
                else "cut_short"
            )
        return found


def _event_with(data: bytes, marker: bytes) -> bytes:
    """The JSON of the first complete ``data:`` event in ``data`` that holds ``marker``."""
    at = data.find(marker)
    if at < 0:
        return b""
    start = data.rfind(b"data: ", 0, at)
    end = data.find(b"\n\n", at)
    return data[start + 6 : end] if start >= 0 and end >= 0 else b""


def _input(text: str) -> dict:
    return {
        "content": [{"type": "input_text", "text": text}],
        "attachments": [],
        "inference_options": {},
    }


class Visitor:
    """One browser tab talking ChatKit to ``path`` on ``port``."""

    def __init__(
        self,
        port: int,
        path: str,
        text: str,
        *,
        messages_per_thread: int = 5,
        own_address: bool = False,
        timeout: float = 60.0,
    ) -> None:
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "Origin": f"http://127.0.0.1:{port}",
        }
        if own_address:
            n = next(_addresses)
            headers["X-Forwarded-For"] = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        self.conn = _Connection(port, headers)
        self.path, self.text, self.timeout = path, text, timeout
        self.per_thread = messages_per_thread
        self.thread_id: str | None = None
        self.sent = 0

    async def message(self, result: Result | None = None) -> Result:
        if self.thread_id is None or self.sent >= self.per_thread:
            kind, body = (
                "create",
                {"type": "threads.create", "params": {"input": _input(self.text)}},
            )
        else:
            kind, body = (
                "add",
                {
                    "type": "threads.add_user_message",
                    "params": {"thread_id": self.thread_id, "input": _input(self.text)},
                },
            )
        r = result or Result(kind)
        r.kind = kind
        created = await _guarded(
            self.conn,
            r,
            self.conn.post(
                self.path,
                json.dumps(body).encode(),
                r,
                b"text_delta",
                b'"thread.item.done"',
                self.timeout,
                b'"thread.created"' if kind == "create" else b"",
            ),
        )
        if kind == "create":
            thread = json.loads(created).get("thread", {}) if created else {}
            self.thread_id, self.sent = (thread.get("id"), 1) if r.ok and thread else (None, 0)
        elif r.ok:
            self.sent += 1
        else:
            self.thread_id = None  # what a visitor does after an error: start over
        return r

    async def close(self) -> None:
        self.conn.close()


class ModelCaller:
    """The same message straight to the fake model's ``/v1/responses`` (streamed)."""

    def __init__(self, port: int, text: str, timeout: float = 60.0) -> None:
        self.conn = _Connection(
            port, {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
        )
        self.body = json.dumps(
            {
                "model": "gpt-4.1-mini",
                "stream": True,
                "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}],
            }
        ).encode()
        self.timeout = timeout

    async def message(self, result: Result | None = None) -> Result:
        r = result or Result("model")
        await _guarded(
            self.conn,
            r,
            self.conn.post(
                "/v1/responses",
                self.body,
                r,
                b"response.output_text.delta",
                b"response.completed",
                self.timeout,
            ),
        )
        return r

    async def close(self) -> None:
        self.conn.close()


async def _guarded(conn: _Connection, r: Result, call) -> bytes:  # type: ignore[no-untyped-def]
    try:
        return await call
    except (
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        TimeoutError,
        ValueError,
    ) as exc:
        conn.close()
        r.ok, r.error = False, type(exc).__name__
        if r.total_s is None:
            r.total_s = now() - r.started if r.started else None
        return b""


async def closed_loop(
    callers: Sequence[Caller], seconds: float, think: float, record: Callable[[Result], None]
) -> None:
    """Each caller sends a message, reads the answer, waits ``think`` seconds, again, until
    ``seconds`` have passed (answers in flight then are read to their end)."""
    deadline = now() + seconds

    async def run(caller: Caller) -> None:
        while now() < deadline:
            r = await caller.message()
            record(r)
            if not r.ok:
                await asyncio.sleep(0.05)  # a refused message comes back at once: no spin
            if think:
                await asyncio.sleep(think)

    await asyncio.gather(*(run(c) for c in callers))
