"""Server mode's gunicorn worker shares a burst of new keep-alive connections between its
workers (uvicorn alone lets the first worker to wake take them all; a visitor's connection then
stays on that worker while the other idles)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.test_multiprocess import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = "chatkit_flask.server.asgi_worker.ChatKitWorker"
VISITORS = 16


def _get(conn: socket.socket) -> int:
    """One keep-alive GET on ``conn``: the pid of the worker holding the connection."""
    conn.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.rsplit(b"\r\n\r\n", 1)[1]:
        chunk = conn.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    return int(data.rsplit(b"\r\n\r\n", 1)[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
            _get(probe)
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_burst_of_keep_alive_connections_is_shared_by_both_workers(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", WORKER, "-w", "2", "--threads", "4",
             "-b", f"127.0.0.1:{port}", "tests.pid_wsgi:app"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while log.read_text().count("Booting worker") < 2 or not _answers(port):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1.0)  # both workers past start-up, waiting on the shared socket
        for _ in range(3):  # each round: a burst of visitors opening their tabs at once
            conns = [socket.create_connection(("127.0.0.1", port), timeout=5)
                     for _ in range(VISITORS)]  # fmt: skip
            try:
                held = Counter(_get(conn) for conn in conns)
                # Each connection keeps its worker: ask again on every one.
                assert Counter(_get(conn) for conn in conns) == held
            finally:
                for conn in conns:
                    conn.close()
            assert len(held) == 2, held
            assert min(held.values()) >= VISITORS // 4, held
            time.sleep(0.3)  # the closed connections leave both workers
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert "Traceback" not in log.read_text()
