"""A fake OpenAI ChatKit sessions API: stdlib-only asyncio HTTP/1.1 server with real sockets.

Used by the test suite (in-process, background thread), the benchmark (it must sustain far more
load than the service under test) and the offline demo::

    python -m chatkit_flask.testing.fake_chatkit --port 8787 --latency 0.05

Implements ``POST /v1/chatkit/sessions`` and ``POST /v1/chatkit/sessions/{id}/cancel`` with the
upstream shapes (``chatkit.session`` objects, OpenAI error envelopes, ``x-request-id`` headers),
and lets tests script faults (errors, 429 + ``Retry-After``, slow answers, connection resets,
non-JSON bodies, missing ``client_secret``, hangs, a body dripped byte by byte, huge bodies,
gzip bombs, deeply nested JSON) through :meth:`FakeChatKit.enqueue` and
:meth:`FakeChatKit.set_default`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import socket
import struct
import sys
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from ._loopback import LoopbackServer, RecordedRequest, serve_until_signalled

__all__ = ["Behaviour", "FakeChatKit", "RecordedRequest", "error_envelope", "main"]

SESSIONS_PATH = "/v1/chatkit/sessions"
BETA_HEADER_VALUE = "chatkit_beta=v1"
DEFAULT_EXPIRES_SECONDS = 600
MAX_EXPIRES_SECONDS = 600
DEFAULT_RATE_LIMIT = 10
MAX_BODY_BYTES = 1024 * 1024

_CANCEL_RE = re.compile(r"^/v1/chatkit/sessions/([^/]+)/cancel$")
_JSON = "application/json"


def error_envelope(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """Return an OpenAI-style error envelope ``{"error": {...}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_STATUS_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Bad request.", "invalid_request_error", None),
    401: ("Incorrect API key provided", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to access this resource.", "invalid_request_error", None),
    404: ("Not found.", "invalid_request_error", None),
    408: ("Request timed out.", "invalid_request_error", None),
    409: ("Conflict.", "invalid_request_error", None),
    422: ("Unprocessable entity.", "invalid_request_error", None),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    502: ("Bad gateway.", "server_error", None),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
    504: ("Gateway timeout.", "server_error", None),
}


@dataclass(frozen=True)
class Behaviour:
    """How the fake answers one session-create request.

    ``Behaviour()`` is the default (validate the request and mint a session). ``status`` and
    ``body`` give an explicit JSON answer (``body=None`` with a non-200 status gives a generic
    error envelope). ``headers`` are added to whatever is answered; ``delay`` is slept (without
    blocking other connections) before answering. ``raw_body`` sends a non-JSON body with
    ``content_type``. ``drop_connection`` aborts the socket with an RST and no response;
    ``never_respond`` holds the request until the client goes away or the server stops;
    ``omit_client_secret`` answers the default success without ``client_secret``.
    ``drip`` sends the body one byte every ``drip`` seconds; ``filler_bytes`` sends a body of
    that many bytes (never held in memory) instead of ``raw_body``; ``content_encoding`` adds a
    ``Content-Encoding`` header (the body is sent as given).
    """

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw_body: bytes | None = None
    content_type: str = _JSON
    drop_connection: bool = False
    never_respond: bool = False
    omit_client_secret: bool = False
    drip: float = 0.0
    filler_bytes: int | None = None
    content_encoding: str | None = None

    @classmethod
    def ok(cls, delay: float = 0.0) -> Behaviour:
        """The default behaviour (validate, mint a session), optionally delayed."""
        return cls(delay=delay)

    @classmethod
    def respond(
        cls, status: int, body: Any, headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> Behaviour:
        """Answer with an explicit status and JSON body."""
        return cls(status=status, body=body, headers=dict(headers or {}), delay=delay)

    @classmethod
    def error(
        cls,
        status: int,
        message: str | None = None,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> Behaviour:
        """Answer ``status`` with an OpenAI error envelope (sensible defaults per status)."""
        d_msg, d_type, d_code = _STATUS_ERRORS.get(
            status,
            (f"HTTP {status}", "server_error" if status >= 500 else "invalid_request_error", None),
        )
        body = error_envelope(message or d_msg, type or d_type, param, code or d_code)
        return cls(status=status, body=body, headers=dict(headers or {}), delay=delay)

    @classmethod
    def rate_limited(cls, retry_after: float | None = 7, message: str | None = None) -> Behaviour:
        """429 with a rate-limit envelope and (unless None) a ``Retry-After`` header."""
        headers = {} if retry_after is None else {"Retry-After": _fmt_number(retry_after)}
        return cls.error(429, message, headers=headers)

    @classmethod
    def reset(cls, delay: float = 0.0) -> Behaviour:
        """Abort the connection (TCP RST) after reading the request, without answering."""
        return cls(drop_connection=True, delay=delay)

    @classmethod
    def slow(cls, seconds: float) -> Behaviour:
        """The default answer, but only after ``seconds``."""
        return cls(delay=seconds)

    @classmethod
    def non_json(
        cls,
        body: bytes = b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        status: int = 200,
        content_type: str = "text/html; charset=utf-8",
    ) -> Behaviour:
        """Answer ``status`` (200 by default) with a body that is not JSON."""
        return cls(status=status, raw_body=body, content_type=content_type)

    @classmethod
    def missing_secret(cls) -> Behaviour:
        """A normal 200 ``chatkit.session`` object without ``client_secret``."""
        return cls(omit_client_secret=True)

    @classmethod
    def slow_drip(cls, interval: float = 1.0, body: bytes | None = None) -> Behaviour:
        """A 200 whose headers come at once and whose body (a valid session by default) then
        trickles in one byte every ``interval`` seconds."""
        if body is None:
            body = json.dumps(
                {"id": "cksess_drip", "client_secret": "ek_fake_drip", "expires_at": 2**31 - 1}
            ).encode()
        return cls(raw_body=body, content_type=_JSON, drip=interval)

    @classmethod
    def huge(cls, size: int, status: int = 200) -> Behaviour:
        """``status`` with a ``size``-byte body (``Content-Length`` announced), streamed."""
        return cls(status=status, filler_bytes=size, content_type=_JSON)

    @classmethod
    def gzip_bomb(cls, size: int) -> Behaviour:
        """A 200 with ``Content-Encoding: gzip`` whose body inflates to ``size`` bytes."""
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
        block = b"0" * (1024 * 1024)
        parts = [compressor.compress(block) for _ in range(size // len(block))]
        parts.append(compressor.compress(b"0" * (size % len(block))))
        parts.append(compressor.flush())
        return cls(raw_body=b"".join(parts), content_type=_JSON, content_encoding="gzip")

    @classmethod
    def deep_json(cls, depth: int) -> Behaviour:
        """A 200 whose body is valid JSON nested ``depth`` levels deep (``[[[...]]]``)."""
        return cls(raw_body=b"[" * depth + b"]" * depth, content_type=_JSON)

    @classmethod
    def hang(cls) -> Behaviour:
        """Never answer; the connection is released when the client gives up or on stop()."""
        return cls(never_respond=True)


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.envelope = error_envelope(message, param=param, code=code)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_session_body(body: Any) -> dict[str, Any]:
    """Validate a session-create body; return the resolved fields or raise _BadRequest."""
    if not isinstance(body, dict):
        raise _BadRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "payload, but what was sent was not valid JSON."
        )
    user = body.get("user")
    if user is None:
        raise _BadRequest(
            "Missing required parameter: 'user'.", "user", "missing_required_parameter"
        )
    if not isinstance(user, str) or not user:
        raise _BadRequest("Invalid 'user': expected a non-empty string.", "user", "invalid_value")
    workflow = body.get("workflow")
    if workflow is None:
        raise _BadRequest(
            "Missing required parameter: 'workflow'.", "workflow", "missing_required_parameter"
        )
    if not isinstance(workflow, dict):
        raise _BadRequest(
            "Invalid type for 'workflow': expected an object.", "workflow", "invalid_type"
        )
    wf_id = workflow.get("id")
    if wf_id is None:
        raise _BadRequest(
            "Missing required parameter: 'workflow.id'.",
            "workflow.id",
            "missing_required_parameter",
        )
    if not isinstance(wf_id, str):
        raise _BadRequest(
            "Invalid type for 'workflow.id': expected a string.", "workflow.id", "invalid_type"
        )
    version = workflow.get("version")
    if version is not None and not isinstance(version, str):
        raise _BadRequest(
            "Invalid type for 'workflow.version': expected a string.",
            "workflow.version",
            "invalid_type",
        )
    state_variables = workflow.get("state_variables")
    if state_variables is not None and not isinstance(state_variables, dict):
        raise _BadRequest(
            "Invalid type for 'workflow.state_variables': expected an object.",
            "workflow.state_variables",
            "invalid_type",
        )
    tracing = workflow.get("tracing")
    tracing_enabled = True
    if tracing is not None:
        if not isinstance(tracing, dict) or not isinstance(tracing.get("enabled", True), bool):
            raise _BadRequest(
                "Invalid 'workflow.tracing': expected {'enabled': bool}.",
                "workflow.tracing",
                "invalid_type",
            )
        tracing_enabled = tracing.get("enabled", True)

    seconds = DEFAULT_EXPIRES_SECONDS
    expires_after = body.get("expires_after")
    if expires_after is not None:
        if not isinstance(expires_after, dict):
            raise _BadRequest(
                "Invalid type for 'expires_after': expected an object.",
                "expires_after",
                "invalid_type",
            )
        if expires_after.get("anchor") != "created_at":
            raise _BadRequest(
                "Invalid 'expires_after.anchor': expected 'created_at'.",
                "expires_after.anchor",
                "invalid_value",
            )
        seconds = expires_after.get("seconds")
        if not _is_int(seconds):
            raise _BadRequest(
                "Invalid type for 'expires_after.seconds': expected an integer.",
                "expires_after.seconds",
                "invalid_type",
            )
        if seconds < 1:
            raise _BadRequest(
                "Invalid 'expires_after.seconds': integer below minimum value. Expected a value "
                f">= 1, but got {seconds} instead.",
                "expires_after.seconds",
                "integer_below_min_value",
            )
        if seconds > MAX_EXPIRES_SECONDS:
            raise _BadRequest(
                "Invalid 'expires_after.seconds': integer above maximum value. Expected a value "
                f"<= {MAX_EXPIRES_SECONDS}, but got {seconds} instead.",
                "expires_after.seconds",
                "integer_above_max_value",
            )

    rpm = DEFAULT_RATE_LIMIT
    rate_limits = body.get("rate_limits")
    if rate_limits is not None:
        value = rate_limits.get("max_requests_per_1_minute") if isinstance(rate_limits, dict) else 0
        if value is not None:
            if not _is_int(value) or value < 1:
                raise _BadRequest(
                    "Invalid 'rate_limits.max_requests_per_1_minute': expected an integer >= 1.",
                    "rate_limits.max_requests_per_1_minute",
                    "invalid_value",
                )
            rpm = value

    config: dict[str, dict[str, Any]] = {
        "automatic_thread_titling": {"enabled": True},
        "file_upload": {"enabled": False, "max_file_size": 512, "max_files": 10},
        "history": {"enabled": True, "recent_threads": None},
    }
    overrides = body.get("chatkit_configuration")
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise _BadRequest(
                "Invalid type for 'chatkit_configuration': expected an object.",
                "chatkit_configuration",
                "invalid_type",
            )
        for key, section in overrides.items():
            if key not in config or not isinstance(section, dict):
                raise _BadRequest(
                    f"Invalid 'chatkit_configuration.{key}'.",
                    f"chatkit_configuration.{key}",
                    "invalid_value",
                )
            config[key].update({k: v for k, v in section.items() if k in config[key]})

    return {
        "user": user,
        "workflow": {
            "id": wf_id,
            "version": version,
            "state_variables": state_variables,
            "tracing": {"enabled": tracing_enabled},
        },
        "seconds": seconds,
        "rpm": rpm,
        "chatkit_configuration": config,
    }


class FakeChatKit(LoopbackServer):
    """In-process fake of the ChatKit sessions API on a real loopback socket.

    ``start()`` runs an asyncio loop in a daemon thread; all public methods are thread-safe.
    ``latency`` (seconds) is slept before every session-create answer and may be changed at
    runtime. ``max_history`` bounds the retained recorded requests and remembered sessions
    (``count`` still counts every request since the last ``clear()``).
    """

    _thread_name = "fake-chatkit"
    _log_name = "fake_chatkit"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        api_key: str | None = None,
        *,
        max_history: int = 10_000,
    ) -> None:
        super().__init__(host, port, max_history=max_history)
        self.latency = latency
        self.api_key = api_key
        self.log_requests = False
        self._queue: deque[Behaviour] = deque()
        self._default: Behaviour | None = None
        self._sessions: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # ------------------------------------------------------------- recording API
    @property
    def last(self) -> RecordedRequest | None:
        """The most recent recorded request, if any."""
        with self._cond:
            return self._records[-1] if self._records else None

    def clear(self) -> None:
        """Forget recorded requests, scripted behaviours, the default override and sessions."""
        with self._cond:
            super().clear()
            self._queue.clear()
            self._default = None
            self._sessions.clear()

    @property
    def sessions(self) -> dict[str, dict[str, Any]]:
        """A snapshot of the remembered sessions by id."""
        with self._cond:
            return {k: dict(v) for k, v in self._sessions.items()}

    # ------------------------------------------------------------- scripting API
    def enqueue(self, *behaviours: Behaviour) -> None:
        """Script the next session-create answers, consumed in order before the default."""
        with self._cond:
            self._queue.extend(behaviours)

    def set_default(self, behaviour: Behaviour | None) -> None:
        """Behaviour used when the queue is empty (None restores normal handling)."""
        with self._cond:
            self._default = behaviour

    @property
    def pending(self) -> int:
        """Number of scripted behaviours not consumed yet."""
        with self._cond:
            return len(self._queue)

    def _next_behaviour(self) -> Behaviour | None:
        with self._cond:
            return self._queue.popleft() if self._queue else self._default

    # ---------------------------------------------------------------- HTTP layer
    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read and answer one request; return False when the connection must be closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                self._write(writer, 400, error_envelope("Malformed request."), (), False)
            return False
        except asyncio.LimitOverrunError:
            self._write(writer, 431, error_envelope("Request headers too large."), (), False)
            return False

        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._write(writer, 400, error_envelope("Malformed request line."), (), False)
            return False
        method, path, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                self._write(writer, 400, error_envelope("Malformed header line."), (), False)
                return False
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value

        conn_hdr = headers.get("connection", "").lower()
        # HTTP/1.1 defaults to keep-alive; HTTP/1.0 only keeps the connection when asked to.
        http10 = version == "HTTP/1.0"
        keep_alive = ("keep-alive" in conn_hdr) if http10 else ("close" not in conn_hdr)

        if "transfer-encoding" in headers:
            self._write(
                writer, 400, error_envelope("Chunked request bodies are not supported."), (), False
            )
            return False
        try:
            length = int(headers.get("content-length", "0"))
            if length < 0:
                raise ValueError
        except ValueError:
            self._write(writer, 400, error_envelope("Invalid Content-Length."), (), False)
            return False
        if length > MAX_BODY_BYTES:
            self._write(writer, 413, error_envelope("Request body too large."), (), False)
            return False
        if length and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        raw_body = await reader.readexactly(length) if length else b""

        parsed: Any = None
        if raw_body:
            try:
                parsed = json.loads(raw_body)
            except ValueError:
                parsed = None
        self._record(RecordedRequest(method, path, headers, parsed, raw_body))
        if self.log_requests:
            print(f"fake_chatkit: {method} {path}", file=sys.stderr)

        route = path.split("?", 1)[0]
        if route == SESSIONS_PATH:
            if method != "POST":
                return self._write(
                    writer, 405, error_envelope(f"Method {method} not allowed."), (), keep_alive
                )
            return await self._create_session(reader, writer, headers, raw_body, parsed, keep_alive)
        match = _CANCEL_RE.match(route)
        if match and method == "POST":
            status, body = self._cancel_session(headers, match.group(1))
            return self._write(writer, status, body, (), keep_alive)
        return self._write(
            writer,
            404,
            error_envelope(f"Invalid URL ({method} {route})"),
            (),
            keep_alive,
        )

    def _check_headers(self, headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        key = self.api_key
        if key is not None and headers.get("authorization") != f"Bearer {key}":
            return 401, error_envelope(
                "Incorrect API key provided", "invalid_request_error", None, "invalid_api_key"
            )
        if headers.get("openai-beta") != BETA_HEADER_VALUE:
            return 400, error_envelope(
                f"You must provide the 'OpenAI-Beta: {BETA_HEADER_VALUE}' header to access the "
                "ChatKit API.",
                "invalid_request_error",
                None,
                "missing_beta_header",
            )
        return None

    def _mint_session(
        self, headers: dict[str, str], raw_body: bytes, parsed: Any
    ) -> tuple[int, Any]:
        failed = self._check_headers(headers)
        if failed is not None:
            return failed
        try:
            fields = _validate_session_body(parsed if raw_body else None)
        except _BadRequest as exc:
            return 400, exc.envelope
        rpm = fields["rpm"]
        session = {
            "id": "cksess_" + secrets.token_hex(16),
            "object": "chatkit.session",
            "client_secret": "ek_fake_" + secrets.token_hex(16),
            "expires_at": int(time.time()) + fields["seconds"],
            "status": "active",
            "user": fields["user"],
            "workflow": fields["workflow"],
            "rate_limits": {"max_requests_per_1_minute": rpm},
            "max_requests_per_1_minute": rpm,
            "chatkit_configuration": fields["chatkit_configuration"],
        }
        with self._cond:
            self._sessions[session["id"]] = session
            while len(self._sessions) > self._max_history:
                self._sessions.popitem(last=False)
        return 200, session

    def _cancel_session(self, headers: dict[str, str], session_id: str) -> tuple[int, Any]:
        failed = self._check_headers(headers)
        if failed is not None:
            return failed
        with self._cond:
            session = self._sessions.get(session_id)
            if session is None:
                return 404, error_envelope(f"Chatkit Session with id '{session_id}' not found.")
            session["status"] = "cancelled"
            return 200, dict(session)

    async def _create_session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        headers: dict[str, str],
        raw_body: bytes,
        parsed: Any,
        keep_alive: bool,
    ) -> bool:
        behaviour = self._next_behaviour()
        if behaviour is not None and behaviour.never_respond:
            await reader.read()  # until the client closes (or stop() cancels us)
            return False
        wait = self.latency + (behaviour.delay if behaviour is not None else 0.0)
        if wait > 0:
            await asyncio.sleep(wait)
        if behaviour is None:
            status, body = self._mint_session(headers, raw_body, parsed)
            return self._write(writer, status, body, (), keep_alive)
        if behaviour.drop_connection:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        extra = tuple(behaviour.headers.items())
        if behaviour.content_encoding is not None:
            extra += (("Content-Encoding", behaviour.content_encoding),)
        if behaviour.drip > 0 or behaviour.filler_bytes is not None:
            return await self._write_streamed(writer, behaviour, extra)
        if behaviour.raw_body is not None:
            return self._write(
                writer,
                behaviour.status,
                behaviour.raw_body,
                extra,
                keep_alive,
                content_type=behaviour.content_type,
            )
        if behaviour.body is not None or behaviour.status != 200:
            body = behaviour.body
            if body is None:
                body = Behaviour.error(behaviour.status).body
            return self._write(
                writer, behaviour.status, body, extra, keep_alive, behaviour.content_type
            )
        status, body = self._mint_session(headers, raw_body, parsed)
        if behaviour.omit_client_secret and status == 200:
            body = {k: v for k, v in body.items() if k != "client_secret"}
        return self._write(writer, status, body, extra, keep_alive)

    async def _write_streamed(
        self,
        writer: asyncio.StreamWriter,
        behaviour: Behaviour,
        extra: tuple[tuple[str, str], ...],
    ) -> bool:
        """Headers at once, then the body byte by byte (``drip``) or in 64 KiB blocks of filler
        (``filler_bytes``); the connection is closed afterwards."""
        body = behaviour.raw_body or b""
        size = behaviour.filler_bytes if behaviour.filler_bytes is not None else len(body)
        head = [f"HTTP/1.1 {behaviour.status} {HTTPStatus(behaviour.status).phrase}"]
        head.append(f"Content-Type: {behaviour.content_type}")
        head.append(f"x-request-id: req_{secrets.token_hex(16)}")
        head.extend(f"{name}: {value}" for name, value in extra)
        head += [f"Content-Length: {size}", "Connection: close"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        if behaviour.filler_bytes is not None:
            block = b" " * 65536
            sent = 0
            while sent < size and not writer.transport.is_closing():
                piece = block[: size - sent]
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
            return False
        for index in range(len(body)):
            if writer.transport.is_closing():
                break
            writer.write(body[index : index + 1])
            await writer.drain()
            await asyncio.sleep(behaviour.drip)
        return False

    def _write(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: Any,
        extra_headers: tuple[tuple[str, str], ...] | list[tuple[str, str]],
        keep_alive: bool,
        content_type: str = _JSON,
    ) -> bool:
        """Serialise and write a response; return ``keep_alive``."""
        if writer.transport.is_closing():
            return False
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        custom = {name.lower() for name, _ in extra_headers}
        out = [f"HTTP/1.1 {status} {phrase}"]
        if "content-type" not in custom:
            out.append(f"Content-Type: {content_type}")
        if "x-request-id" not in custom:
            out.append(f"x-request-id: req_{secrets.token_hex(16)}")
        out.extend(f"{name}: {value}" for name, value in extra_headers)
        out.append(f"Content-Length: {len(payload)}")
        out.append("Connection: keep-alive" if keep_alive else "Connection: close")
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + payload)
        if self.log_requests:
            print(f"fake_chatkit: -> {status} ({len(payload)} bytes)", file=sys.stderr)
        return keep_alive


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """Run the fake server in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m chatkit_flask.testing.fake_chatkit", description="Fake OpenAI ChatKit API."
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=8787, help="TCP port (0 = any free port)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per session create")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every response")
    args = parser.parse_args(argv)
    return asyncio.run(_serve_cli(args))


async def _serve_cli(args: argparse.Namespace) -> int:
    fake = FakeChatKit(args.host, args.port, latency=args.latency, api_key=args.api_key)
    fake.log_requests = args.verbose
    return await serve_until_signalled(fake, "fake ChatKit API")


if __name__ == "__main__":
    sys.exit(main())
