"""Client for the ChatKit sessions API. No Flask imports: usable and testable on its own.

Transport concerns (a keep-alive connection pool per thread, the total deadline, bounded retries)
live here; callers see ``ChatKitClient.create_session`` and a small error hierarchy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .breaker import CircuitBreaker
from .sanitize import redact_credentials

if TYPE_CHECKING:
    import requests

# requests and urllib3 are imported where a mint uses them: server mode never does, and its
# processes are spared their ~4 MB.

__all__ = [
    "ChatKitClient",
    "ChatKitSession",
    "CircuitOpen",
    "UpstreamBusy",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]

_RETRY_STATUSES = frozenset({502, 503, 504})
_DETAIL_LIMIT = 500  # characters of an upstream error body kept for the log
_CONNECT_TIMEOUT = 5.0
# A session object is under 2 KiB; anything over this is refused unread (a 300 MiB body took a
# worker to 1.2 GiB). Of an error body only what the log keeps is read.
MAX_BODY_BYTES = 64 * 1024
_ERROR_BODY_BYTES = 4 * 1024
_CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True)
class _Answer:
    """An upstream answer whose body was read within the deadline and the size cap."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class ChatKitSession:
    """What the browser needs from a created session, plus what the log needs."""

    client_secret: str
    expires_at: int
    session_id: str | None
    request_id: str | None
    status: int
    latency_ms: float
    attempts: int

    def __repr__(self) -> str:  # never show the secret in a traceback or log
        return f"ChatKitSession(id={self.session_id!r}, expires_at={self.expires_at})"


class UpstreamError(Exception):
    """The ChatKit API did not give a usable session.

    ``detail`` holds a truncated upstream body for the server log only; it is never shown to
    the browser. The exception text never contains the API key or a client secret.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        detail: str = "",
        latency_ms: float = 0.0,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id
        self.detail = detail
        self.latency_ms = latency_ms
        self.attempts = attempts


class UpstreamRejected(UpstreamError):
    """A 4xx other than 429: the key, project or workflow is misconfigured."""


class UpstreamBusy(UpstreamError):
    """The upstream answered 429. ``retry_after`` is in seconds."""

    def __init__(self, message: str, *, retry_after: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    """5xx, connection failure, or a 2xx that is not a usable session."""


class UpstreamTimeout(UpstreamError):
    """The total deadline passed."""


class CircuitOpen(UpstreamUnavailable):
    """Not attempted: the circuit breaker is open after repeated upstream failures.

    ``retry_after`` is the remaining cool-down in whole seconds (at least 1).
    """

    def __init__(self, message: str, *, retry_after: int, **kwargs: Any) -> None:
        super().__init__(message, attempts=0, **kwargs)
        self.retry_after = retry_after


def _retry_after_seconds(value: str | None) -> int:
    try:
        seconds = int(float(value)) if value else 1
    except ValueError:
        seconds = 1
    return min(max(seconds, 1), 60)


class ChatKitClient:
    """Creates ChatKit sessions. Thread-safe: each thread gets its own keep-alive session."""

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str = "https://api.openai.com",
        timeout: float = 15.0,
        retries: int = 2,
        pool_size: int = 4,
        backoff: float = 0.1,
        breaker_failures: int = 5,
        breaker_cooldown: float = 10.0,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._api_key = api_key
        self._base = api_base.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self._pool_size = pool_size
        self._backoff = backoff
        self._local = threading.local()
        # Per process: after N consecutive failures, answer at once for a cool-down.
        self.breaker = breaker or CircuitBreaker(breaker_failures, breaker_cooldown)
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "OpenAI-Beta": "chatkit_beta=v1",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "identity",  # compressed answers are refused, see _read
            "User-Agent": "chatkit-flask",
        }

    def __repr__(self) -> str:
        return f"ChatKitClient(api_base={self._base!r})"

    def _session(self) -> requests.Session:
        # requests.Session is not documented as thread-safe; one per thread keeps the
        # keep-alive benefit without sharing a pool across threads.
        session = getattr(self._local, "session", None)
        if session is None:
            import requests
            from requests.adapters import HTTPAdapter

            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self._pool_size, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.trust_env = False  # no proxy or netrc surprises; the key goes only to the base
            self._local.session = session
        return session

    def create_session(
        self,
        *,
        workflow_id: str,
        user: str,
        ttl: int,
        workflow_version: str | None = None,
        rate_limit: int | None = None,
        chatkit_configuration: dict[str, Any] | None = None,
    ) -> ChatKitSession:
        """POST /v1/chatkit/sessions and return the session, or raise an ``UpstreamError``."""
        workflow: dict[str, Any] = {"id": workflow_id}
        if workflow_version:
            workflow["version"] = workflow_version
        body: dict[str, Any] = {
            "workflow": workflow,
            "user": user,
            "expires_after": {"anchor": "created_at", "seconds": ttl},
        }
        if rate_limit is not None:
            body["rate_limits"] = {"max_requests_per_1_minute": rate_limit}
        if chatkit_configuration:
            body["chatkit_configuration"] = chatkit_configuration
        allowed, remaining = self.breaker.allow()
        if not allowed:
            retry_after = self.breaker.retry_after(remaining)
            raise CircuitOpen("upstream circuit open; not calling", retry_after=retry_after)
        try:
            session = self._create(body, ttl)
        except (UpstreamUnavailable, UpstreamTimeout):
            self.breaker.record_failure()
            raise
        except UpstreamError:
            self.breaker.record_success()  # a 4xx or 429: the upstream is up and answering
            raise
        except BaseException:
            self.breaker.record_failure()  # never leave a half-open trial unaccounted for
            raise
        self.breaker.record_success()
        return session

    def _create(self, body: dict[str, Any], ttl: int) -> ChatKitSession:
        response, started, attempts = self._post("/v1/chatkit/sessions", body)
        latency_ms = (time.monotonic() - started) * 1000
        data = self._check(response, latency_ms, attempts)
        secret = data.get("client_secret")
        expires_at = data.get("expires_at")
        if not isinstance(secret, str) or not secret:
            raise UpstreamUnavailable(
                "upstream answered without a client_secret",
                status=response.status_code,
                request_id=response.headers.get("x-request-id"),
                detail="keys: " + ",".join(sorted(map(str, data))),
                latency_ms=latency_ms,
                attempts=attempts,
            )
        if not isinstance(expires_at, int) or isinstance(expires_at, bool):
            # The schema makes expires_at required; if it ever goes missing, derive it.
            expires_at = int(time.time()) + ttl
        session_id = data.get("id")
        return ChatKitSession(
            client_secret=secret,
            expires_at=expires_at,
            session_id=session_id if isinstance(session_id, str) else None,
            request_id=response.headers.get("x-request-id"),
            status=response.status_code,
            latency_ms=latency_ms,
            attempts=attempts,
        )

    def cancel_session(self, session_id: str) -> dict[str, Any]:
        """POST /v1/chatkit/sessions/{id}/cancel; returns the session object (status cancelled)."""
        if not session_id or "/" in session_id:
            raise ValueError("session_id must be a non-empty id")
        response, started, attempts = self._post(f"/v1/chatkit/sessions/{session_id}/cancel", None)
        return self._check(response, (time.monotonic() - started) * 1000, attempts)

    def _post(self, path: str, body: dict[str, Any] | None) -> tuple[_Answer, float, int]:
        import requests

        url = self._base + path
        payload = json.dumps(body, separators=(",", ":")) if body is not None else None
        started = time.monotonic()
        deadline = started + self.timeout
        # The thread's adapter (its keep-alive pool) is driven directly: Session.post's merging
        # of settings, cookie jar and hooks cost ~130 us of CPU per call and gave nothing here
        # (no redirects, no cookies, no proxies). See docs/benchmark.md.
        adapter = self._session().get_adapter(url)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamTimeout(
                    "upstream deadline passed",
                    latency_ms=(time.monotonic() - started) * 1000,
                    attempts=attempt - 1,
                )
            try:
                request = requests.PreparedRequest()
                request.prepare(method="POST", url=url, headers=self._headers, data=payload)
                response = adapter.send(
                    request, stream=True, timeout=(min(_CONNECT_TIMEOUT, remaining), remaining)
                )
            except requests.exceptions.ConnectTimeout:
                error: Exception = UpstreamTimeout("upstream connect timed out")
            except requests.exceptions.Timeout:
                # The request was sent; a retry could only mint a second session late.
                raise UpstreamTimeout(
                    "upstream did not answer before the deadline",
                    latency_ms=(time.monotonic() - started) * 1000,
                    attempts=attempt,
                ) from None
            except requests.exceptions.RequestException as exc:
                error = UpstreamUnavailable(f"upstream connection failed: {type(exc).__name__}")
            else:
                if response.status_code not in _RETRY_STATUSES or attempt > self.retries:
                    answer = self._read(response, deadline, started, attempt)
                    return answer, started, attempt
                response.close()
                error = UpstreamUnavailable(f"upstream answered {response.status_code}")
            if attempt > self.retries or not self._sleep_before_retry(attempt, deadline):
                if isinstance(error, UpstreamError):
                    error.latency_ms = (time.monotonic() - started) * 1000
                    error.attempts = attempt
                raise error

    def _read(
        self, response: requests.Response, deadline: float, started: float, attempts: int
    ) -> _Answer:
        """The body, read within the deadline (checked between reads, each read bounded by the
        time left) and the size cap; never decompressed (we ask for identity)."""
        import urllib3

        status = response.status_code
        common: dict[str, Any] = {
            "status": status,
            "request_id": response.headers.get("x-request-id"),
            "attempts": attempts,
        }
        limit = MAX_BODY_BYTES if status < 300 else _ERROR_BODY_BYTES
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        length = response.headers.get("Content-Length", "").strip()
        refused = None
        if encoding not in ("", "identity"):
            # Refused, not inflated: a 1 MiB gzip bomb inflated a worker to 2.4 GiB.
            refused = f"upstream answered with Content-Encoding {encoding[:20]!r}"
        elif status < 300 and length.isdigit() and int(length) > MAX_BODY_BYTES:
            refused = f"upstream answer of {int(length)} bytes is over {MAX_BODY_BYTES}"
        if refused is not None:
            response.close()
            elapsed = (time.monotonic() - started) * 1000
            raise UpstreamUnavailable(refused, latency_ms=elapsed, **common)
        raw = response.raw
        connection = getattr(raw, "connection", None)
        sock = getattr(connection, "sock", None)
        chunks: list[bytes] = []
        size = 0
        try:
            while size <= limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpstreamTimeout(
                        "upstream body not received before the deadline",
                        latency_ms=(time.monotonic() - started) * 1000,
                        **common,
                    )
                if sock is not None:
                    # A drip-feed resets a per-read timeout with every byte; this bounds the
                    # whole body by the deadline (a 1 byte/s body answered after 56 s).
                    sock.settimeout(remaining)
                chunk = raw.read1(_CHUNK_BYTES, decode_content=False)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
            response.close()
            raise UpstreamTimeout(
                "upstream body not received before the deadline",
                latency_ms=(time.monotonic() - started) * 1000,
                **common,
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            response.close()
            raise UpstreamUnavailable(
                f"upstream body could not be read: {type(exc).__name__}",
                latency_ms=(time.monotonic() - started) * 1000,
                **common,
            ) from None
        except UpstreamError:
            response.close()
            raise
        body = b"".join(chunks)
        if size > limit:
            response.close()  # the rest is never read; the connection is not reused
            if status < 300:
                raise UpstreamUnavailable(
                    f"upstream answer is over {MAX_BODY_BYTES} bytes",
                    latency_ms=(time.monotonic() - started) * 1000,
                    **common,
                )
            body = body[:limit]  # an error body: the log keeps its start only
        return _Answer(status, response.headers, body)

    def _sleep_before_retry(self, attempt: int, deadline: float) -> bool:
        pause = self._backoff * (2 ** (attempt - 1))
        if time.monotonic() + pause >= deadline:
            return False
        time.sleep(pause)
        return True

    def _redact(self, text: str) -> str:
        # An upstream or a proxy in between may echo the Authorization header back, whole or in
        # part ("sk-proj-****abcd"), and an error page may quote a session's client secret.
        return redact_credentials(text, self._api_key)

    def _check(self, response: _Answer, latency_ms: float, attempts: int) -> dict[str, Any]:
        status = response.status_code
        request_id = response.headers.get("x-request-id")
        common: dict[str, Any] = {
            "status": status,
            "request_id": request_id,
            "latency_ms": latency_ms,
            "attempts": attempts,
        }
        if status >= 300:
            detail = self._redact(response.text)[:_DETAIL_LIMIT]
            if status == 429:
                raise UpstreamBusy(
                    "upstream rate limited the request",
                    retry_after=_retry_after_seconds(response.headers.get("Retry-After")),
                    detail=detail,
                    **common,
                )
            if 400 <= status < 500:
                raise UpstreamRejected(
                    f"upstream rejected the request ({status})", detail=detail, **common
                )
            raise UpstreamUnavailable(f"upstream failed ({status})", detail=detail, **common)
        try:
            data = response.json()
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            # A 2xx body may hold a client secret in a shape we do not parse: keep none of it.
            content_type = response.headers.get("Content-Type", "-")
            raise UpstreamUnavailable(
                "upstream answered with a body that is not JSON",
                detail=f"{len(response.body)} bytes of {content_type[:60]} (body not kept)",
                **common,
            ) from None
        if not isinstance(data, dict):
            raise UpstreamUnavailable("upstream answered with JSON that is not an object", **common)
        return data
