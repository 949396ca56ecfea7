"""A fake OpenAI Responses API (``POST /v1/responses``): stdlib asyncio HTTP/1.1 on a real socket.

For tests of server mode (the real ``AsyncOpenAI`` client and Agents SDK talk to it), the offline
demo, the benchmark, and operators rehearsing faults against a running service::

    python -m chatkit_flask.testing.fake_responses --port 8788 --token-delay 0.02
    python -m chatkit_flask.testing.fake_responses --words 400 --cut-after 50 --times 3
    python -m chatkit_flask.testing.fake_responses --call-tool show_slots '{"day": "Monday"}' \
        --reply "Pick one."

The CLI scripts what :class:`Reply` and :class:`Turn` script from Python (``--help``): reply
text or length, delay per word, an HTTP error, a stall, a cut stream, usage figures, and tool
calls before the reply.

A streamed request (``"stream": true``) is answered with Server-Sent Events in the order the
Agents SDK relies on: ``response.created``, ``response.in_progress``,
``response.output_item.added`` (a ``message`` with a unique id), ``response.content_part.added``,
``response.output_text.delta`` x n (one per word, ``token_delay`` apart),
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done`` and
``response.completed`` with ``usage`` (one token per word). A request's ``max_output_tokens``
is honoured as the real API does: the reply stops after that many tokens and ends with
``response.incomplete`` (reason ``max_output_tokens``, with usage). The reply echoes the last
user message ("You said: ...") unless a :class:`Reply` is enqueued.
``Reply.call_tool(name, arguments)`` answers with a function call instead
(``response.output_item.added`` with a ``function_call`` item, the arguments' delta and done
events, ``response.output_item.done``, ``response.completed``): the Agents SDK runs the
tool and asks again with its output, which the next reply answers. Every request is recorded; a
client that hangs up before the stream ends is recorded as an :class:`Abort`.
A :class:`Turn` scripts a whole answer to one visitor message (tool calls, then a reply), also
for conversations that run at the same time; the CLI's ``--call-tool NAME JSON`` makes one.

Dictation: ``POST /v1/audio/transcriptions`` (multipart, as the openai client sends it) answers
``{"text", "usage"}``: "Transcribed N bytes of audio." unless a reply is scripted with
:meth:`FakeResponses.enqueue_transcription` (its own queue; a ``Reply``'s text, status and
token figures apply, and its ``token_delay`` is how long it takes). Usage is one input token
per 100 bytes of audio and one output token per word. The request is recorded with its form
fields as ``json`` (the file as its name, type and size).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import sys
import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from http import HTTPStatus
from typing import Any

from ._loopback import ClientGone, LoopbackServer, RecordedRequest, serve_until_signalled
from .fake_chatkit import error_envelope

__all__ = [
    "Abort", "FakeResponses", "RecordedRequest", "Reply", "ToolCall", "Turn", "main", "words",
]

RESPONSES_PATH = "/v1/responses"
TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
MAX_BODY_BYTES = 32 * 1024 * 1024  # histories can be long; OpenAI takes 25 MB of audio
_TOKEN_RE = re.compile(r"\s*\S+")

_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Bad request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
}


@dataclass(frozen=True)
class ToolCall:
    """A function call the fake model makes: the tool's ``name`` and its JSON ``arguments``."""

    name: str
    arguments: str = "{}"


@dataclass(frozen=True)
class Reply:
    """How the fake answers one request (consumed in order by :meth:`FakeResponses.enqueue`).

    ``text=None`` echoes the last user message. A non-200 ``status`` answers ``body`` (an OpenAI
    error envelope by default) instead of a stream. ``break_after`` cuts the connection after that
    many text deltas; ``hang_after`` stops sending (but keeps the connection) after that many
    deltas, or before any response at all when 0 and ``status`` is 200. ``token_delay`` overrides
    the server's delay for this reply. ``input_tokens``/``output_tokens`` replace the usage the
    fake reports (by default: words of the input, deltas of the reply). ``tool`` (see
    :meth:`call_tool`) asks the caller to run a function tool instead of answering text.
    """

    text: str | None = None
    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    break_after: int | None = None
    hang_after: int | None = None
    token_delay: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    tool: ToolCall | None = None

    @classmethod
    def call_tool(cls, name: str, arguments: Mapping[str, Any] | None = None) -> Reply:
        """Ask for the function tool ``name`` with ``arguments`` (a JSON object)."""
        return cls(tool=ToolCall(name, json.dumps(dict(arguments or {}))))

    @classmethod
    def error(cls, status: int, message: str | None = None, **headers: str) -> Reply:
        """Answer ``status`` with an OpenAI error envelope."""
        d_msg, d_type, d_code = _ERRORS.get(
            status, (f"HTTP {status}", "server_error" if status >= 500 else "invalid_request_error",
                     None)
        )
        return cls(status=status, body=error_envelope(message or d_msg, d_type, None, d_code),
                   headers=headers)

    @classmethod
    def rate_limited(cls, retry_after: int = 7) -> Reply:
        """429 with a rate-limit envelope and ``Retry-After``."""
        return cls.error(429, **{"retry-after": str(retry_after)})

    @classmethod
    def broken(cls, after_tokens: int = 2, text: str | None = None) -> Reply:
        """Stream ``after_tokens`` deltas, then drop the connection (no ``response.completed``)."""
        return cls(text=text, break_after=after_tokens)

    @classmethod
    def hang(cls, after_tokens: int = 0, text: str | None = None) -> Reply:
        """Stop sending after ``after_tokens`` deltas (0: before the response headers)."""
        return cls(text=text, hang_after=after_tokens)


@dataclass(frozen=True)
class Turn:
    """A whole answer to one visitor message: the model calls ``calls`` one per model request,
    in order, then answers with ``reply`` (default: the echo).

    Which step a request is at is read from the request itself (the tool outputs after its
    last user message), not from the order requests arrive in: visitors talking at the same
    time each get the whole turn. A request that offers no tools (a thread title's) gets
    ``reply``. Queued (:meth:`FakeResponses.enqueue`), a turn answers one message: it leaves
    the queue once its ``reply`` went to a request that offered tools.
    """

    calls: tuple[ToolCall, ...]
    reply: Reply = field(default_factory=Reply)

    @classmethod
    def of(
        cls, *calls: tuple[str, Mapping[str, Any] | None], reply: Reply | str | None = None
    ) -> Turn:
        """``Turn.of(("show_slots", {"day": "Monday"}), reply="Pick one.")``."""
        final = Reply(text=reply) if isinstance(reply, str) else reply or Reply()
        return cls(tuple(ToolCall(name, json.dumps(dict(args or {}))) for name, args in calls),
                   final)  # fmt: skip

    def step(self, request: Mapping[str, Any]) -> Reply:
        """The reply for ``request``: the next tool call of this turn, or the final reply."""
        if not request.get("tools"):
            return self.reply
        done = _tool_outputs_since_user(request.get("input"))
        return Reply(tool=self.calls[done]) if done < len(self.calls) else self.reply


@dataclass(frozen=True)
class Abort:
    """A client hung up before the answer was complete."""

    at: float  # time.monotonic() when the fake noticed
    started: float  # time.monotonic() when the request arrived
    tokens_sent: int
    path: str


class FakeResponses(LoopbackServer):
    """In-process fake of the Responses API on a loopback socket.

    ``start()`` serves from a daemon thread; every public method is thread-safe. ``api_key``
    (when set) must arrive as ``Authorization: Bearer KEY``, else 401. ``models`` (when set)
    are the model names it knows; another is a 404 ``model_not_found``, as OpenAI answers.
    ``token_delay`` seconds pass between text deltas and may be changed at runtime.
    """

    _thread_name = "fake-responses"
    _log_name = "fake_responses"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        token_delay: float = 0.0,
        max_history: int = 10_000,
        models: Collection[str] | None = None,
    ) -> None:
        super().__init__(host, port, max_history=max_history)
        self.api_key = api_key
        self.token_delay = token_delay
        self.models = None if models is None else frozenset(models)
        self._completed = 0
        self._aborts: list[Abort] = []
        self._queue: deque[Reply | Turn] = deque()
        self._default: Reply | Turn | None = None
        self._transcriptions: deque[Reply] = deque()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: what ``AsyncOpenAI(base_url=...)`` expects."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host  # noqa: S104
        return f"http://{host}:{self.port}/v1"

    # ---------------------------------------------------------- recording API
    @property
    def completed(self) -> int:
        """Streams that reached ``response.completed``."""
        with self._cond:
            return self._completed

    @property
    def aborts(self) -> list[Abort]:
        """Requests whose client hung up before the end, in the order noticed."""
        with self._cond:
            return list(self._aborts)

    @property
    def aborted(self) -> int:
        with self._cond:
            return len(self._aborts)

    def input_parts(self, kind: str, index: int = -1) -> list[dict[str, Any]]:
        """The content parts of type ``kind`` (``input_image``, ``input_file``,
        ``input_text``) in the user messages of a recorded request (the last by default):
        what the model was shown, attachments included."""
        body = self.requests[index].json
        items = body.get("input") if isinstance(body, dict) else None
        parts: list[dict[str, Any]] = []
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict) or item.get("role") != "user":
                continue
            content = item.get("content")
            if isinstance(content, list):
                parts += [p for p in content if isinstance(p, dict) and p.get("type") == kind]
        return parts

    def wait_for_abort(self, n: int = 1, timeout: float = 5.0) -> list[Abort]:
        """Block until ``n`` clients hung up mid-answer (``TimeoutError`` otherwise)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._aborts) >= n, timeout):
                raise TimeoutError(f"expected {n} aborts, got {len(self._aborts)} after {timeout}s")
            return list(self._aborts)

    def clear(self) -> None:
        """Forget recorded requests, aborts and scripted replies (the default one too)."""
        with self._cond:
            super().clear()
            self._aborts.clear()
            self._queue.clear()
            self._transcriptions.clear()
            self._default = None
            self._completed = 0

    def enqueue(self, *replies: Reply | Turn | str) -> None:
        """Script the next answers in order (a ``str`` is ``Reply(text=...)``; a
        :class:`Turn` answers every model request of one message)."""
        with self._cond:
            self._queue.extend(Reply(text=r) if isinstance(r, str) else r for r in replies)

    def enqueue_transcription(self, *replies: Reply | str) -> None:
        """Script the next transcriptions in order (a ``str`` is the transcript)."""
        with self._cond:
            self._transcriptions.extend(Reply(text=r) if isinstance(r, str) else r for r in replies)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def set_default(self, reply: Reply | Turn | str | None) -> None:
        """How to answer once the queue is empty (None: echo the last user message; a
        :class:`Turn`: that turn for every message)."""
        with self._cond:
            self._default = Reply(text=reply) if isinstance(reply, str) else reply

    def _next_reply(self, request: Mapping[str, Any]) -> Reply:
        with self._cond:
            if not self._queue:
                default = self._default or Reply()
                return default.step(request) if isinstance(default, Turn) else default
            head = self._queue[0]
            if not isinstance(head, Turn):
                return self._queue.popleft()
            reply = head.step(request)
            if reply is head.reply and request.get("tools"):
                self._queue.popleft()
            return reply

    # ------------------------------------------------------------ HTTP layer
    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return False
        started = time.monotonic()
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return self._write_json(writer, 400, error_envelope("Malformed request line."), False)
        method, path, _version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return self._write_json(writer, 400, error_envelope("Invalid Content-Length."), False)
        if length < 0 or length > MAX_BODY_BYTES or "transfer-encoding" in headers:
            return self._write_json(writer, 400, error_envelope("Unsupported body."), False)
        raw = await reader.readexactly(length) if length else b""
        route = path.split("?", 1)[0]
        parsed: Any
        if route == TRANSCRIPTIONS_PATH:
            parsed = _form_fields(headers.get("content-type", ""), raw)
        else:
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
        self._record(RecordedRequest(method, path, headers, parsed, raw))

        keep_alive = "close" not in headers.get("connection", "").lower()
        if route == TRANSCRIPTIONS_PATH and method == "POST":
            return await self._transcribe(writer, headers, parsed, keep_alive)
        if route != RESPONSES_PATH or method != "POST":
            body = error_envelope(f"Invalid URL ({method} {route})")
            return self._write_json(writer, 404, body, keep_alive)
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return self._write_json(writer, 401, Reply.error(401).body, keep_alive)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), str):
            body = error_envelope("Missing required parameter: 'model'.", param="model")
            return self._write_json(writer, 400, body, keep_alive)

        if self.models is not None and parsed["model"] not in self.models:
            body = error_envelope(
                f"The model `{parsed['model']}` does not exist or you do not have access to it.",
                "invalid_request_error", None, "model_not_found",
            )  # fmt: skip
            return self._write_json(writer, 404, body, keep_alive)
        reply = self._next_reply(parsed)
        if reply.status != 200:
            body = reply.body if reply.body is not None else Reply.error(reply.status).body
            return self._write_json(writer, reply.status, body, keep_alive, reply.headers)
        text = reply.text if reply.text is not None else _echo(parsed)
        if not parsed.get("stream"):
            if reply.hang_after is not None:
                await self._until_client_leaves(reader, started, 0, path)
            item_id = _new_id("fc" if reply.tool else "msg")
            output = [_function_call(reply.tool, item_id, "completed")] if reply.tool else None
            response = _response(parsed, text, item_id, "completed", output=output, reply=reply)
            return self._write_json(writer, 200, response, keep_alive)
        return await self._stream(reader, writer, parsed, text, reply, started, path, keep_alive)

    async def _transcribe(
        self,
        writer: asyncio.StreamWriter,
        headers: dict[str, str],
        form: dict[str, Any] | None,
        keep_alive: bool,
    ) -> bool:
        """``POST /v1/audio/transcriptions``: the scripted transcript, or one naming the size,
        after the reply's ``token_delay`` seconds (a recording being transcribed)."""
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return self._write_json(writer, 401, Reply.error(401).body, keep_alive)
        audio = (form or {}).get("file")
        if not isinstance(audio, dict) or not isinstance((form or {}).get("model"), str):
            body = error_envelope("Send a multipart form with 'file' and 'model'.", param="file")
            return self._write_json(writer, 400, body, keep_alive)
        with self._cond:
            reply = self._transcriptions.popleft() if self._transcriptions else Reply()
        if reply.token_delay:
            await asyncio.sleep(reply.token_delay)
        if reply.status != 200:
            body = reply.body if reply.body is not None else Reply.error(reply.status).body
            return self._write_json(writer, reply.status, body, keep_alive, reply.headers)
        text = reply.text
        if text is None:
            text = f"Transcribed {audio['size']} bytes of audio."
        input_tokens = reply.input_tokens
        if input_tokens is None:
            input_tokens = max(1, audio["size"] // 100)
        output_tokens = reply.output_tokens
        if output_tokens is None:
            output_tokens = len(text.split())
        usage = {"type": "tokens", "input_tokens": input_tokens, "output_tokens": output_tokens,
                 "total_tokens": input_tokens + output_tokens,
                 "input_token_details": {"audio_tokens": input_tokens, "text_tokens": 0}}
        return self._write_json(writer, 200, {"text": text, "usage": usage}, keep_alive)

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: dict[str, Any],
        text: str,
        reply: Reply,
        started: float,
        path: str,
        keep_alive: bool,
    ) -> bool:
        if reply.hang_after == 0:
            await self._until_client_leaves(reader, started, 0, path)
        if reply.tool is not None:
            return await self._stream_tool_call(writer, request, reply, keep_alive)
        # The client sends nothing more while it reads the answer, so any read completing
        # (EOF) means it hung up: that is how an abort is noticed between deltas.
        client_gone = asyncio.ensure_future(reader.read(1))
        delay = self.token_delay if reply.token_delay is None else reply.token_delay
        tokens = _TOKEN_RE.findall(text) or [""]
        cap = request.get("max_output_tokens")
        cut = isinstance(cap, int) and 0 < cap < len(tokens)
        if cut:
            tokens = tokens[:cap]
            text = "".join(tokens)
        item_id = _new_id("msg")
        sent = 0
        seq = iter(range(1_000_000))

        def event(kind: str, **fields: Any) -> bytes:
            payload = {"type": kind, "sequence_number": next(seq), **fields}
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

        try:
            head = [
                "HTTP/1.1 200 OK",
                "Content-Type: text/event-stream; charset=utf-8",
                f"x-request-id: req_{secrets.token_hex(12)}",
                "Transfer-Encoding: chunked",
                "Connection: keep-alive" if keep_alive else "Connection: close",
            ]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            in_progress = _response(request, "", item_id, "in_progress", output=[])
            message = {"id": item_id, "type": "message", "role": "assistant",
                       "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            await self._send(writer, client_gone,
                             event("response.created", response=in_progress)
                             + event("response.in_progress", response=in_progress)
                             + event("response.output_item.added", output_index=0, item=message)
                             + event("response.content_part.added", item_id=item_id,
                                     output_index=0, content_index=0, part=part))
            for token in tokens:
                if reply.break_after is not None and sent >= reply.break_after:
                    writer.transport.abort()  # mid-stream failure: no completed event
                    return False
                if reply.hang_after is not None and sent >= reply.hang_after:
                    await client_gone  # silent until the client gives up
                    raise ClientGone
                if delay > 0:
                    done, _ = await asyncio.wait({client_gone}, timeout=delay)
                    if done:
                        raise ClientGone
                await self._send(writer, client_gone,
                                 event("response.output_text.delta", item_id=item_id,
                                       output_index=0, content_index=0, delta=token,
                                       logprobs=[]))
                sent += 1
            done_part = {**part, "text": text}
            status = "incomplete" if cut else "completed"
            done_message = {**message, "status": status, "content": [done_part]}
            final = _response(request, text, item_id, status, reply=reply)
            await self._send(writer, client_gone,
                             event("response.output_text.done", item_id=item_id, output_index=0,
                                   content_index=0, text=text, logprobs=[])
                             + event("response.content_part.done", item_id=item_id,
                                     output_index=0, content_index=0, part=done_part)
                             + event("response.output_item.done", output_index=0,
                                     item=done_message)
                             + event(f"response.{status}", response=final))
            with self._cond:  # counted before the client can see the end
                self._completed += 1
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ClientGone, ConnectionError):
            self._record_abort(started, sent, path)
            raise ClientGone from None
        finally:
            # Wait for the watcher to really stop: the next request on this connection must not
            # find it still reading (StreamReader allows one reader).
            client_gone.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await client_gone
        return keep_alive

    async def _stream_tool_call(
        self,
        writer: asyncio.StreamWriter,
        request: dict[str, Any],
        reply: Reply,
        keep_alive: bool,
    ) -> bool:
        """One function call, streamed the way the Responses API streams it (no text), with the
        reply's token usage if it sets one."""
        tool = reply.tool
        assert tool is not None
        item_id = _new_id("fc")
        seq = iter(range(1_000_000))

        def event(kind: str, **fields: Any) -> bytes:
            payload = {"type": kind, "sequence_number": next(seq), **fields}
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

        call = _function_call(tool, item_id, "in_progress")
        done = {**call, "arguments": tool.arguments, "status": "completed"}
        in_progress = _response(request, "", item_id, "in_progress", output=[])
        final = _response(request, "", item_id, "completed", output=[done], reply=reply)
        body = (
            event("response.created", response=in_progress)
            + event("response.in_progress", response=in_progress)
            + event("response.output_item.added", output_index=0, item=call)
            + event("response.function_call_arguments.delta", item_id=item_id, output_index=0,
                    delta=tool.arguments)
            + event("response.function_call_arguments.done", item_id=item_id, output_index=0,
                    name=tool.name, arguments=tool.arguments)
            + event("response.output_item.done", output_index=0, item=done)
            + event("response.completed", response=final)
        )
        head = [
            "HTTP/1.1 200 OK",
            "Content-Type: text/event-stream; charset=utf-8",
            f"x-request-id: req_{secrets.token_hex(12)}",
            f"Content-Length: {len(body)}",
            "Connection: keep-alive" if keep_alive else "Connection: close",
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        with self._cond:
            self._completed += 1
        await writer.drain()
        return keep_alive

    async def _send(
        self, writer: asyncio.StreamWriter, client_gone: asyncio.Future[bytes], data: bytes
    ) -> None:
        if client_gone.done() or writer.transport.is_closing():
            raise ClientGone
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()

    async def _until_client_leaves(
        self, reader: asyncio.StreamReader, started: float, sent: int, path: str
    ) -> None:
        await reader.read()
        self._record_abort(started, sent, path)
        raise ClientGone

    def _record_abort(self, started: float, sent: int, path: str) -> None:
        with self._cond:
            self._aborts.append(Abort(time.monotonic(), started, sent, path))
            self._cond.notify_all()

    def _write_json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: Any,
        keep_alive: bool,
        extra: Mapping[str, str] | None = None,
    ) -> bool:
        if writer.transport.is_closing():
            return False
        payload = json.dumps(body).encode()
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        head = [f"HTTP/1.1 {status} {phrase}", "Content-Type: application/json",
                f"x-request-id: req_{secrets.token_hex(12)}"]
        head += [f"{name}: {value}" for name, value in (extra or {}).items()]
        head += [f"Content-Length: {len(payload)}",
                 "Connection: keep-alive" if keep_alive else "Connection: close"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        return keep_alive


# ------------------------------------------------------------------ payloads
def _form_fields(content_type: str, body: bytes) -> dict[str, Any] | None:
    """A multipart form's fields: text as text, a file as its name, type and size."""
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        return None
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            fields[str(name)] = {"filename": part.get_filename(), "size": len(payload),
                                 "content_type": part.get_content_type()}
        else:
            fields[str(name)] = payload.decode("utf-8", "replace")
    return fields


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _function_call(tool: ToolCall, item_id: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": "call_" + item_id[3:],
            "name": tool.name, "arguments": "" if status == "in_progress" else tool.arguments,
            "status": status}


def _tool_outputs_since_user(items: Any) -> int:
    """Tool outputs in a request's input after its last user message: the steps of the turn
    already taken."""
    count = 0
    for item in reversed(items if isinstance(items, list) else []):
        if not isinstance(item, dict) or item.get("role") == "user":
            break
        count += item.get("type") == "function_call_output"
    return count


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict)]
        return [p["text"] for p in parts if isinstance(p.get("text"), str)]
    return []


def _echo(request: dict[str, Any]) -> str:
    """``You said: <last user message>`` (the whole input when it is a plain string)."""
    items = request.get("input")
    if isinstance(items, str):
        return f"You said: {items}"
    for item in reversed(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            return "You said: " + " ".join(_texts(item.get("content")))
    return "You said nothing."


def _count_words(request: dict[str, Any]) -> int:
    """A stand-in for input tokens: words in the instructions and every input message."""
    words = len(str(request.get("instructions") or "").split())
    items = request.get("input")
    for item in [items] if isinstance(items, str) else items or []:
        for text in _texts(item.get("content") if isinstance(item, dict) else item):
            words += len(text.split())
    return words


def _response(
    request: dict[str, Any],
    text: str,
    item_id: str,
    status: str,
    output: list[Any] | None = None,
    reply: Reply | None = None,
) -> dict[str, Any]:
    if output is None:
        output = [{"id": item_id, "type": "message", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": [],
                                "logprobs": []}]}]
    usage = None
    if status in ("completed", "incomplete"):
        input_tokens, output_tokens = _count_words(request), len(_TOKEN_RE.findall(text))
        if reply is not None and reply.input_tokens is not None:
            input_tokens = reply.input_tokens
        if reply is not None and reply.output_tokens is not None:
            output_tokens = reply.output_tokens
        usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": output_tokens,
                 "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": input_tokens + output_tokens}
    return {
        "id": "resp_" + item_id.split("_", 1)[1], "object": "response",
        "created_at": int(time.time()), "status": status, "model": request.get("model"),
        "instructions": request.get("instructions"), "output": output,
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "metadata": {}, "temperature": 1.0, "top_p": 1.0,
        "text": {"format": {"type": "text"}}, "truncation": "disabled", "usage": usage,
    }


def words(n: int) -> str:
    """A reply of ``n`` words ("word1 word2 ..."): one text delta each."""
    return " ".join(f"word{i}" for i in range(1, n + 1))


# ----------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """Serve in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m chatkit_flask.testing.fake_responses",
        description="Fake OpenAI Responses API on a real socket: streams an echo of the last user "
        "message, or the reply and fault scripted below (a rehearsal of model faults).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=8788, help="TCP port (0 = any free port)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--token-delay", "--word-delay", type=float, default=0.02, metavar="SECONDS",
        help="delay before each word (text delta) of a streamed reply (default: 0.02)",
    )  # fmt: skip
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--reply", default=None, metavar="TEXT", help="answer TEXT (not the echo)")
    text.add_argument("--words", type=int, metavar="N", help="answer N words: a long reply")
    fault = parser.add_mutually_exclusive_group()
    fault.add_argument(
        "--status", type=int, metavar="CODE",
        help="answer HTTP CODE with an OpenAI error body instead of a stream (e.g. 500, 429)",
    )  # fmt: skip
    fault.add_argument(
        "--stall-after", type=int, metavar="N",
        help="send N words, then nothing more, keeping the connection open (0: no headers)",
    )  # fmt: skip
    fault.add_argument(
        "--cut-after", type=int, metavar="N",
        help="send N words, then close the connection without response.completed",
    )  # fmt: skip
    parser.add_argument(
        "--retry-after", type=int, metavar="SECONDS", help="Retry-After header on --status"
    )
    parser.add_argument("--input-tokens", type=int, metavar="N", help="usage.input_tokens")
    parser.add_argument("--output-tokens", type=int, metavar="N", help="usage.output_tokens")
    parser.add_argument(
        "--call-tool", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
        help="before answering, call the function tool NAME with JSON (an object of arguments); "
        "repeatable: one model request per call, in order, then the answer (--reply, --words or "
        "the echo; or the fault). Every visitor message gets all of them, also when several "
        "visitors talk at once",
    )  # fmt: skip
    parser.add_argument(
        "--times", type=int, metavar="N",
        help="script only the first N requests (with --call-tool: messages), then echo as usual "
        "(default: every request)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.calls = [_tool_call(parser, name, arguments) for name, arguments in args.call_tool]
    if args.retry_after is not None and args.status is None:
        parser.error("--retry-after needs --status")
    for name in ("words", "stall_after", "cut_after", "input_tokens", "output_tokens", "times"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    if args.status is not None and not 100 <= args.status <= 599:
        parser.error("--status must be an HTTP status code (100-599)")
    return asyncio.run(_serve_cli(args))


def _scripted_reply(args: argparse.Namespace) -> Reply | None:
    """The :class:`Reply` the CLI options describe (None: nothing scripted, echo)."""
    if args.status is not None and args.status != 200:
        headers = {} if args.retry_after is None else {"retry-after": str(args.retry_after)}
        return Reply.error(args.status, **headers)
    reply = Reply(
        text=words(args.words) if args.words is not None else args.reply,
        break_after=args.cut_after,
        hang_after=args.stall_after,
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
    )
    return None if reply == Reply() else reply


def _tool_call(parser: argparse.ArgumentParser, name: str, arguments: str) -> ToolCall:
    """One ``--call-tool NAME JSON``, checked as the Responses API would see it."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        parser.error(f"--call-tool NAME must be a function name (letters, digits, _, -): {name!r}")
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        parser.error(f"--call-tool {name}: JSON must be an object of arguments, e.g. '{{}}'")
    return ToolCall(name, json.dumps(parsed))


async def _serve_cli(args: argparse.Namespace) -> int:
    fake = FakeResponses(args.host, args.port, api_key=args.api_key, token_delay=args.token_delay)
    reply: Reply | Turn | None = _scripted_reply(args)
    if args.calls:
        reply = Turn(tuple(args.calls), reply if isinstance(reply, Reply) else Reply())
    if reply is not None and args.times is None:
        fake.set_default(reply)
    elif reply is not None:
        fake.enqueue(*[reply] * args.times)
    return await serve_until_signalled(fake, "fake Responses API")


if __name__ == "__main__":
    sys.exit(main())
