"""Closed-loop load of event-stream POSTs on raw asyncio sockets, for bench/server.py.

Each visitor holds one keep-alive connection (as a browser tab does) and sends its next message
when the previous answer has ended. Per message it records the time to the response headers, to
the first model text delta (``first_marker``) and to the end of the stream, and whether the stream
ended as it should (``done_marker`` after the first delta, no ``error`` event).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Message", "Target", "get_cookies", "percentile", "run_load"]

ERROR_EVENT = b'"type": "error"'
ERROR_EVENT_COMPACT = b'"type":"error"'


@dataclass(frozen=True)
class Target:
    """Where the load goes and how an answer is recognised."""

    port: int
    path: str
    body: bytes
    first_marker: bytes  # the first model text delta, as the client sees it
    done_marker: bytes  # the end of the answer (after the first delta)
    cookies: tuple[str, ...] = ()  # one per visitor (``name=value``), none for no cookie


@dataclass
class Message:
    started: float  # time.monotonic()
    status: int = 0
    headers_s: float | None = None
    first_delta_s: float | None = None
    total_s: float | None = None
    ok: bool = False
    error: str = ""


@dataclass
class Load:
    messages: list[Message] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    open_streams: int = 0
    stop_starting: bool = False


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values`` (nearest rank), NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def _request(target: Target, cookie: str | None) -> bytes:
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    head = (
        f"POST {target.path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{extra}"
        f"Content-Length: {len(target.body)}\r\n\r\n"
    )
    return head.encode() + target.body


async def _one(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    payload: bytes,
    target: Target,
    load: Load,
    msg: Message,
    timeout: float,
) -> bool:
    """Send one message and read its answer into ``msg``; True if the connection stays open."""
    writer.write(payload)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    msg.headers_s = time.monotonic() - msg.started
    msg.status = int(head[9:12])
    lower = head.lower()
    keep = b"connection: close" not in lower
    errored = seen_delta = done = False
    load.open_streams += 1
    try:
        if b"transfer-encoding: chunked" in lower:
            while True:
                size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
                size = int(size_line.split(b";", 1)[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                if not seen_delta and target.first_marker in chunk:
                    seen_delta = True
                    msg.first_delta_s = time.monotonic() - msg.started
                if seen_delta and target.done_marker in chunk:
                    done = True
                if ERROR_EVENT in chunk or ERROR_EVENT_COMPACT in chunk:
                    errored = True
        else:
            length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
    finally:
        load.open_streams -= 1
    msg.total_s = time.monotonic() - msg.started
    msg.ok = msg.status == 200 and done and not errored
    if not msg.ok:
        msg.error = (
            f"http_{msg.status}"
            if msg.status != 200
            else "error_event"
            if errored
            else ("no_delta" if not seen_delta else "cut_short")
        )
        load.errors[msg.error] += 1
    return keep


async def _visitor(target: Target, index: int, load: Load, deadline: float, timeout: float) -> None:
    cookie = target.cookies[index % len(target.cookies)] if target.cookies else None
    payload = _request(target, cookie)
    reader = writer = None
    try:
        while not load.stop_starting and time.monotonic() < deadline:
            msg = Message(started=time.monotonic())
            load.messages.append(msg)
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
                assert reader is not None
                if not await _one(reader, writer, payload, target, load, msg, timeout):
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                msg.error = type(exc).__name__
                load.errors[msg.error] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
    finally:
        if writer is not None:
            writer.close()


async def run_load(
    target: Target,
    visitors: int,
    *,
    ramp: float,
    warmup: float,
    duration: float,
    on_window: Callable[[str], None],
    drain: bool = True,
    timeout: float = 60.0,
) -> tuple[list[Message], Counter[str], float, float]:
    """Run ``visitors`` for ``ramp + warmup + duration`` seconds; the visitors start evenly
    spread over ``ramp``. ``on_window("start")`` and ``on_window("end")`` are called at the edges
    of the measured window (take CPU and memory readings there). With ``drain`` the answers in
    flight at the end are awaited, else their connections are closed.

    Returns every message, the error counts, and the window's start and end (monotonic).
    """
    load = Load()
    start = time.monotonic()
    window_start = start + ramp + warmup
    window_end = window_start + duration
    tasks = []
    for i in range(visitors):
        delay = ramp * i / max(1, visitors)
        tasks.append(asyncio.create_task(_delayed(delay, target, i, load, window_end, timeout)))
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    on_window("start")
    await asyncio.sleep(max(0.0, window_end - time.monotonic()))
    on_window("end")
    load.stop_starting = True
    if drain:
        await asyncio.wait(tasks, timeout=timeout)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return load.messages, load.errors, window_start, window_end


async def _delayed(
    delay: float, target: Target, index: int, load: Load, deadline: float, timeout: float
) -> None:
    await asyncio.sleep(delay)
    await _visitor(target, index, load, deadline, timeout)


async def get_cookies(port: int, path: str, name: str, count: int) -> list[str]:
    """``count`` visitor cookies (``name=value``) from ``GET path``, 32 requests at a time."""
    gate = asyncio.Semaphore(32)

    async def one() -> str:
        async with gate:
            for attempt in range(5):  # a busy listener can refuse a burst of connections
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    break
                except OSError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
                )
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            finally:
                writer.close()
        for line in head.split("\r\n"):
            if line.lower().startswith("set-cookie:") and f"{name}=" in line:
                return line.split(":", 1)[1].strip().split(";", 1)[0]
        raise RuntimeError(f"no {name} cookie from GET {path}: {head[:200]!r}")

    return list(await asyncio.gather(*(one() for _ in range(count))))
