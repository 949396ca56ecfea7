"""Exact admission across gunicorn workers sharing the real Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.conftest import REDIS_URL, TEST_API_KEY, TEST_SECRET_KEY, WORKFLOW

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(upstream: FakeChatKit, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "RATELIMIT_"))}
    env.update(
        OPENAI_API_KEY=TEST_API_KEY,
        SECRET_KEY=TEST_SECRET_KEY,
        CHATKIT_WORKFLOW_ID=WORKFLOW,
        CHATKIT_API_BASE=upstream.base_url,
        CHATKIT_COOKIE_SECURE="false",
        RATELIMIT_STORAGE_URI=REDIS_URL,
        CHATKIT_LOG_LEVEL="warning",
    )
    env.update(extra)
    return env


def start_gunicorn(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", *args, "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode() if process.stderr else "exited")
        try:
            if requests.get(base + "/healthz", timeout=1).status_code == 200:
                return process, base
        except requests.RequestException:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("gunicorn did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def gunicorn_service(
    real_redis: Any, upstream: FakeChatKit
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = service_env(
        upstream,
        CHATKIT_RATELIMIT_PER_USER="25 per minute",
        CHATKIT_RATELIMIT_PER_IP="1000 per minute",
    )
    process, base = start_gunicorn(env, "-w", "4", "-k", "gthread", "--threads", "8")
    yield process, base
    stop(process)


def test_one_visitor_across_four_workers_gets_exactly_the_limit(
    gunicorn_service: tuple[subprocess.Popen[bytes], str], upstream: FakeChatKit
) -> None:
    _, base = gunicorn_service
    upstream.latency = 0.02  # keep requests in flight together
    first = requests.post(base + "/api/chatkit/secret", json={}, timeout=10)
    assert first.status_code == 200
    cookie = first.cookies["chatkit_session_id"]

    def mint(_: int) -> int:
        return requests.post(
            base + "/api/chatkit/secret", json={},
            cookies={"chatkit_session_id": cookie},
            timeout=10,
        ).status_code

    with ThreadPoolExecutor(120) as pool:  # 120 requests in flight at once
        statuses = Counter(pool.map(mint, range(240)))
    assert statuses[200] == 24  # 25 minus the first request
    assert statuses[429] == 216
    assert upstream.count == 25  # no rejected request reached the upstream
    users = {request.json["user"] for request in upstream.requests}
    assert len(users) == 1
    # The requests were spread over several workers, so the limit held across processes.
    pids = {int(line.split()[0]) for line in _worker_lines(gunicorn_service[0])}
    assert len(pids) == 4


def _worker_lines(master: subprocess.Popen[bytes]) -> list[str]:
    output = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(master.pid)], capture_output=True, text=True
    ).stdout
    return [line for line in output.splitlines() if line.strip()]
