"""config/Caddyfile in front of gunicorn, run here as compose runs it, without Docker.

Debian's caddy runs the project's own Caddyfile, rendered for loopback: the site address is
plain HTTP on a free port and the upstream is a gunicorn started with config/gunicorn.conf.py
(1 worker x 4 threads) in front of the fake ChatKit API and Redis. The rendering changes only
what a loopback test needs (and what Debian's 2.6.2 spells differently), see render_caddyfile.

Figures (printed with -s): `pytest tests/test_proxy.py -s -k "slow_connections or directly"`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.test_deploy_service import Instance
from tests.test_multiprocess import free_port

ROOT = Path(__file__).resolve().parent.parent
CADDYFILE = ROOT / "config" / "Caddyfile"
MINT = "/api/chatkit/secret"
pytestmark = pytest.mark.slow

# The compose app's settings, with limits high enough for a few hundred mints and the proxy's
# address (loopback here, the edge network in compose) as the trusted one.
APP_SETTINGS = {
    "GUNICORN_WORKERS": "1",
    "GUNICORN_THREADS": "4",
    "GUNICORN_GRACEFUL_TIMEOUT": "2",
    "CHATKIT_RATELIMIT_PER_USER": "10000 per minute",
    "CHATKIT_RATELIMIT_PER_IP": "10000 per minute",
    "CHATKIT_TRUSTED_PROXY_NETWORKS": "127.0.0.1/32",
}


def caddy_binary() -> str:
    binary = shutil.which("caddy")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("caddy is not installed (.ci/install-proxy.sh installs it)")
        pytest.skip("caddy is not installed (run .ci/install-proxy.sh)")
    return binary


def caddy_version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "version"], capture_output=True, text=True, check=True).stdout
    match = re.match(r"v?(\d+)\.(\d+)", out.strip())
    assert match, out
    return int(match.group(1)), int(match.group(2))


def _replace_directive(text: str, old: str, new: str) -> str:
    """Replace the directive line `old` (arguments included), which must occur once."""
    text, count = re.subn(rf"(?m)^(\s*){re.escape(old)}$", rf"\g<1>{new}", text)
    assert count == 1, f"expected the directive {old!r} exactly once in config/Caddyfile"
    return text


def render_caddyfile(version: tuple[int, int], **timeouts: str) -> str:
    """config/Caddyfile as this machine's caddy runs it.

    Site address and upstream come in through the environment, as under compose. Rewritten:
    the named timeouts (to keep a test short), and for caddy < 2.7 the one directive that was
    renamed since (`buffer_requests`, which buffers the whole body without a cap of its own;
    request_body's max_size caps it, below the 2 MB of `request_buffers`).
    """
    text = CADDYFILE.read_text(encoding="utf-8")
    for name, value in timeouts.items():
        current = re.search(rf"(?m)^\s*({name} \S+)$", text)
        assert current, name
        text = _replace_directive(text, current.group(1), f"{name} {value}")
    if version < (2, 7):
        text = _replace_directive(text, "request_buffers 2MB", "buffer_requests")
    return text


class Caddy:
    def __init__(self, tmp: Path, upstream_port: int, **timeouts: str) -> None:
        binary = caddy_binary()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = tmp / f"Caddyfile-{self.port}"
        config.write_text(render_caddyfile(caddy_version(binary), **timeouts), encoding="utf-8")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp),
            "XDG_DATA_HOME": str(tmp / "data"),
            "XDG_CONFIG_HOME": str(tmp / "config"),
            "CHATKIT_SITE_HOST": self.base,
            "CHATKIT_UPSTREAM": f"127.0.0.1:{upstream_port}",
        }
        self.log = tmp / f"caddy-{self.port}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "run", "--adapter", "caddyfile", "--config", str(config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"caddy exited:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("caddy did not start")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def started() -> Iterator[Callable[[Any], Any]]:
    """start(process) registers a Caddy or gunicorn to stop after the test, last first."""
    processes: list[Any] = []

    def start(process: Any) -> Any:
        processes.append(process)
        return process

    yield start
    for process in reversed(processes):
        process.stop()


# --------------------------------------------------------------------------- slow clients


class SlowClients:
    """Connections that send a request a byte at a time: half stuck in the headers, half in
    the body (headers complete, Content-Length 1000, then one body byte a second); plus `idle`
    connections that never send anything."""

    def __init__(self, port: int, count: int, idle: int = 0) -> None:
        self.sockets: list[socket.socket] = []
        self.pending: dict[socket.socket, bytes] = {}
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            if i % 2:
                sock.send(
                    f"POST {MINT} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
                )
                self.pending[sock] = b"{" + b" " * 999
            else:
                self.pending[sock] = f"POST {MINT} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + (
                    b"X-Slow: " + b"s" * 2000
                )
            self.sockets.append(sock)
        for _ in range(idle):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            self.pending[sock] = b""
            self.sockets.append(sock)

    def drip(self) -> None:
        """One more byte on every connection still open."""
        for sock, rest in self.pending.items():
            if rest:
                try:
                    sock.send(rest[:1])
                    self.pending[sock] = rest[1:]
                except OSError:
                    self.pending[sock] = b""

    def still_open(self) -> int:
        return sum(map(self.is_waiting, self.sockets))

    @staticmethod
    def is_waiting(sock: socket.socket) -> bool:
        """The server has neither answered nor closed this connection."""
        try:
            sock.recv(1, socket.MSG_PEEK)  # b"" (closed) or the start of an answer
        except BlockingIOError:
            return True  # nothing to read: the server still waits for us
        except OSError:
            return False  # reset
        return False

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def mint_latencies(
    base: str, clients: SlowClients, seconds: float, timeout: float = 3.0
) -> list[float | str]:
    """Mint every ~0.25 s for `seconds` while the slow clients drip; each entry is the
    latency in seconds, or the error's name."""
    results: list[float | str] = []
    session = requests.Session()
    end = time.monotonic() + seconds
    next_drip = time.monotonic()
    while time.monotonic() < end:
        if time.monotonic() >= next_drip:
            clients.drip()
            next_drip += 1.0
        started_at = time.monotonic()
        try:
            response = session.post(base + MINT, json={}, timeout=timeout)
            assert response.status_code == 200, response.text
            results.append(time.monotonic() - started_at)
        except requests.RequestException as exc:
            results.append(type(exc).__name__)
            session = requests.Session()
        time.sleep(0.25)
    return results


def test_mints_stay_fast_through_the_proxy_under_400_slow_connections(
    real_redis: Any, started: Callable[[Any], Any], upstream: FakeChatKit, tmp_path: Path
) -> None:
    app = started(Instance(upstream, **APP_SETTINGS))
    proxy = started(Caddy(tmp_path, app.port))  # the production timeouts (10 s, 30 s)
    clients = SlowClients(proxy.port, 400, idle=100)
    try:
        results = mint_latencies(proxy.base, clients, seconds=6)
        held = clients.still_open()
        rss = _rss_mb(proxy.process.pid)
    finally:
        clients.close()
    latencies = [r for r in results if isinstance(r, float)]
    print(
        f"\nthrough caddy: {held} slow or idle connections held (caddy RSS {rss:.0f} MB),"
        f" {len(latencies)}/{len(results)} mints answered,"
        f" median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms,"
        f" max {max(latencies) * 1000:.0f} ms"
    )
    assert held == 500, "the connections must all still be open for the load to count"
    assert len(latencies) == len(results) >= 15, results
    assert max(latencies) < 1.0, results


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_the_same_load_against_gunicorn_directly_stalls_mints(
    real_redis: Any, started: Callable[[Any], Any], upstream: FakeChatKit
) -> None:
    """Why the proxy is there: gthread threads block in header and body reads, no deadline."""
    app = started(Instance(upstream, **APP_SETTINGS))
    clients = SlowClients(app.port, 400, idle=100)
    try:
        results = mint_latencies(app.base, clients, seconds=6, timeout=1.5)
    finally:
        clients.close()
    failed = [r for r in results if not isinstance(r, float) or r >= 1.0]
    outcomes = ", ".join(f"{n} {kind}" for kind, n in Counter(map(str, failed)).items())
    print(f"\ngunicorn directly: {len(failed)}/{len(results)} mints failed ({outcomes})")
    assert len(failed) == len(results), results


def test_slow_header_slow_body_and_idle_clients_are_cut_off(
    real_redis: Any, started: Callable[[Any], Any], upstream: FakeChatKit, tmp_path: Path
) -> None:
    app = started(Instance(upstream, **APP_SETTINGS))
    proxy = started(Caddy(tmp_path, app.port, read_header="2s", read_body="3s"))
    clients = SlowClients(proxy.port, 2, idle=1)  # a slow header, a slow body, an idle one
    try:
        assert clients.still_open() == 3
        deadline = time.monotonic() + 6
        closed_at: dict[int, float] = {}
        start = time.monotonic()
        while time.monotonic() < deadline and len(closed_at) < 3:
            clients.drip()
            time.sleep(0.25)
            for i, sock in enumerate(clients.sockets):
                if i not in closed_at and not clients.is_waiting(sock):
                    closed_at[i] = time.monotonic() - start
    finally:
        clients.close()
    assert set(closed_at) == {0, 1, 2}, "a slow or idle client outlived the read timeouts"
    # Header deadline (2 s) for the slow header and the idle one, request deadline (3 s) for
    # the slow body; 1.5 s of slack for the polling and a loaded machine.
    assert closed_at[0] < 2 + 1.5 and closed_at[2] < 2 + 1.5, closed_at
    assert closed_at[1] < 3 + 1.5, closed_at
    assert upstream.count == 0, "an incomplete request led to a mint"


# --------------------------------------------------------------------------- streaming

FRAMES = 4
FRAME_GAP = 1.5


def stream_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    """A server-mode-like reply: text/event-stream frames with pauses between them. Each
    frame carries the time it was produced and the forwarded headers gunicorn received."""
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store")])
    forwarded = f"{environ.get('HTTP_X_FORWARDED_FOR')} {environ.get('HTTP_X_FORWARDED_PROTO')}"

    def frames() -> Iterator[bytes]:
        for i in range(FRAMES):
            if i:
                time.sleep(FRAME_GAP)
            yield f"data: {i} {time.time():.3f} {forwarded}\n\n".encode()

    return frames()


class StreamApp(Instance):
    """gunicorn with config/gunicorn.conf.py serving stream_app instead of wsgi:app (only
    Instance's stop() is shared)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, GUNICORN_BIND=f"127.0.0.1:{self.port}", GUNICORN_WORKERS="1")
        env.update(GUNICORN_THREADS="4", GUNICORN_ACCESS_LOG="off", GUNICORN_GRACEFUL_TIMEOUT="1")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "config/gunicorn.conf.py",
                "tests.test_proxy:stream_app",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.process.stderr.read()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("gunicorn did not start")


@pytest.fixture
def stream_proxy(started: Callable[[Any], Any], tmp_path: Path) -> Caddy:
    app = started(StreamApp())
    # read_body shorter than the stream: a reply may outlive the request's read deadline.
    return started(Caddy(tmp_path, app.port, read_header="2s", read_body="3s"))


def test_event_stream_passes_through_unbuffered(stream_proxy: Caddy) -> None:
    sent = time.time()
    response = requests.post(
        stream_proxy.base + "/api/chatkit",
        json={"type": "threads.create"},
        headers={"X-Forwarded-For": "203.0.113.9"},  # a client's own claim: dropped
        stream=True,
        timeout=10,
    )
    assert response.headers["Content-Type"] == "text/event-stream"
    received: list[tuple[float, list[str]]] = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            received.append((time.time(), line.decode().split()[1:]))
    assert [fields[0] for _, fields in received] == [str(i) for i in range(FRAMES)]
    first_seen = received[0][0]
    last_produced = float(received[-1][1][1])
    # The client had the first frame before the app produced the last one.
    assert first_seen - sent < FRAME_GAP  # before the second frame exists (slack for load)
    assert first_seen < last_produced - (FRAMES - 2) * FRAME_GAP
    # Every frame arrived within moments of being produced, after the 3 s read_body too.
    for seen, fields in received:
        assert seen - float(fields[1]) < 0.5, (seen, fields)
    # The app saw the real client (loopback here), not the spoofed header, and the scheme.
    assert received[0][1][2:] == ["127.0.0.1", "http"]


def test_metrics_are_not_served_and_large_bodies_are_refused(stream_proxy: Caddy) -> None:
    for path in ("/metrics", "/metrics/", "/METRICS"):
        response = requests.get(stream_proxy.base + path, timeout=5)
        assert response.status_code == 404 and response.content == b"", path
    # Over request_body's 1 MB: 413 from Caddy 2.7+, 502 from Debian's 2.6.2 (whose proxy
    # reports the failed body read as an upstream error). Refused either way.
    response = requests.post(
        stream_proxy.base + "/api/chatkit", data=b"x" * 1_100_000, timeout=10
    )
    assert response.status_code in (413, 502)
    ok = requests.post(stream_proxy.base + "/api/chatkit", data=b"x" * 900_000, timeout=10)
    assert ok.status_code == 200
    # Attachment uploads may be as large as CHATKIT_ATTACHMENT_MAX_BYTES (5 MiB) and framing.
    upload = stream_proxy.base + "/api/chatkit/uploads/token"
    assert requests.post(upload, data=b"x" * 5_500_000, timeout=20).status_code == 200
    assert requests.post(upload, data=b"x" * 6_500_000, timeout=20).status_code in (413, 502)
