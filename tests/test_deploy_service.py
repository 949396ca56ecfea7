"""What the container runs, run here: `gunicorn -c config/gunicorn.conf.py wsgi:app` with the
environment docker-compose.yml gives the `app` service, against the real local Redis."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.conftest import REDIS_URL, TEST_API_KEY, WORKFLOW
from tests.test_multiprocess import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
URL = "/api/chatkit/secret"


def compose_app_environment(upstream: FakeChatKit, port: int, **extra: str) -> dict[str, str]:
    """.env.example (secrets filled in) + the compose file's `environment`, with the `redis`
    service host pointed at the local Redis test database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "RATELIMIT_"))}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for key, value in compose["services"]["app"]["environment"].items():
        # ${NAME:-default} / ${NAME:?error} as Compose substitutes them from .env.
        env[key] = re.sub(
            r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}",
            lambda m: env.get(m.group(1)) or m.group(2) or "",
            str(value),
        )
    assert urlsplit(env["RATELIMIT_STORAGE_URI"]).hostname == "redis"
    env.update(
        RATELIMIT_STORAGE_URI=REDIS_URL,
        OPENAI_API_KEY=TEST_API_KEY,
        SECRET_KEY="deploy-test-secret-key-0123456789abcdef",
        CHATKIT_BACKEND="hosted",  # .env.example names server, the default
        CHATKIT_WORKFLOW_ID=WORKFLOW,
        CHATKIT_API_BASE=upstream.base_url,
        CHATKIT_COOKIE_SECURE="false",
        PORT=str(port),
        GUNICORN_BIND=f"127.0.0.1:{port}",  # the container binds 0.0.0.0; loopback is enough here
        GUNICORN_ACCESS_LOG="off",
    )
    env.update(extra)
    return env


class Instance:
    def __init__(self, upstream: FakeChatKit, **extra: str) -> None:
        self.port = free_port()
        self.env = compose_app_environment(upstream, self.port, **extra)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.process.stderr.read()}")
            try:
                if requests.get(self.base + "/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("gunicorn did not start")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture
def instances(real_redis: Any, upstream: FakeChatKit) -> Iterator[list[Instance]]:
    started: list[Instance] = []
    yield started
    for instance in started:
        instance.stop()


def test_compose_healthcheck_command_succeeds_against_the_service(
    instances: list[Instance], upstream: FakeChatKit
) -> None:
    instance = Instance(upstream)
    instances.append(instance)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    test = compose["services"]["app"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    command = [sys.executable if part == "python" else part for part in test[1:]]
    result = subprocess.run(command, env=instance.env, capture_output=True, timeout=10)
    assert result.returncode == 0, result.stderr
    # And it fails when the service is not there.
    instance.stop()
    result = subprocess.run(command, env=instance.env, capture_output=True, timeout=10)
    assert result.returncode != 0


def test_two_replicas_on_one_redis_admit_exactly_the_limit(
    instances: list[Instance], upstream: FakeChatKit
) -> None:
    limits = {"CHATKIT_RATELIMIT_PER_USER": "12 per minute"}
    replicas = [Instance(upstream, **limits), Instance(upstream, **limits)]
    instances.extend(replicas)
    upstream.latency = 0.02
    first = requests.post(replicas[0].base + URL, json={}, timeout=10)
    cookie = first.cookies["chatkit_session_id"]

    def mint(i: int) -> int:
        replica = replicas[i % 2]  # a load balancer spreading one visitor over both
        return requests.post(
            replica.base + URL, json={}, cookies={"chatkit_session_id": cookie}, timeout=10
        ).status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = Counter(pool.map(mint, range(80)))
    assert first.status_code == 200
    assert statuses == {200: 11, 429: 69}
    assert upstream.count == 12


def test_sigterm_finishes_in_flight_mints(instances: list[Instance], upstream: FakeChatKit) -> None:
    instance = Instance(upstream, CHATKIT_RATELIMIT_PER_IP="1000 per minute")
    instances.append(instance)
    upstream.latency = 1.0
    results: list[int | str] = []
    lock = threading.Lock()

    def mint() -> None:
        try:
            status: int | str = requests.post(instance.base + URL, json={}, timeout=15).status_code
        except requests.RequestException as exc:
            status = type(exc).__name__
        with lock:
            results.append(status)

    threads = [threading.Thread(target=mint) for _ in range(12)]
    for thread in threads:
        thread.start()
    upstream.wait_for(12, timeout=10)  # every mint is in flight upstream
    instance.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=20)
    exit_code = instance.process.wait(timeout=30)
    assert results == [200] * 12
    assert exit_code == 0


def test_compose_app_with_a_two_key_env_serves_a_server_mode_chat(
    real_redis: Any, tmp_path: Path
) -> None:
    """`docker compose up` with a fresh .env (OPENAI_API_KEY and SECRET_KEY only), run as the
    processes compose would start: the image's defaults (HOST, the /data instance folder), the
    app service's environment with REDIS_PASSWORD unset (Redis without a password), the model at
    the fake. The demo page loads and a message is answered through the model."""
    from chatkit_flask.testing.fake_responses import FakeResponses
    from tests.server_support import sse_events, user_input

    port = free_port()
    dotenv = {"OPENAI_API_KEY": TEST_API_KEY, "SECRET_KEY": "compose-two-keys-" + "s" * 24}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHATKIT_", "RATELIMIT_", "GUNICORN_", "OPENAI_"))}  # fmt: skip
    env.update(HOST="0.0.0.0", PYTHONPATH="/app/site")  # the Dockerfile's ENV
    env.update(dotenv)  # env_file: .env
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for key, value in compose["services"]["app"]["environment"].items():
        env[key] = re.sub(
            r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: dotenv.get(m.group(1)) or m.group(2) or "",
            str(value),
        )  # fmt: skip
    assert env["RATELIMIT_STORAGE_URI"] == "redis://:@redis:6379/0"  # no password
    assert env["CHATKIT_STORE_URL"] == "sqlite:////data/chatkit-threads.db"
    # What differs on this machine: the redis service's address, the volume's path, the model
    # (the fake instead of api.openai.com) and loopback instead of the compose network.
    env.update(
        RATELIMIT_STORAGE_URI=REDIS_URL,
        CHATKIT_STORE_URL=f"sqlite:///{tmp_path}/chatkit-threads.db",
        GUNICORN_BIND=f"127.0.0.1:{port}",
        GUNICORN_WORKERS="2",
        CHATKIT_ENV_FILE=str(tmp_path / "empty.env"),  # not the checkout's own .env
        OPENAI_AGENTS_DISABLE_TRACING="1",
    )
    (tmp_path / "empty.env").write_text("")
    with FakeResponses(api_key=TEST_API_KEY) as fake:
        env["OPENAI_BASE_URL"] = fake.base_url
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, process.stderr.read()
                try:
                    if requests.get(base + "/readyz", timeout=5).ok:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
            page = requests.get(base + "/", timeout=10)
            assert page.status_code == 200 and "<openai-chatkit" in page.text
            body = {"type": "threads.create", "params": {"input": user_input("compose hello")}}
            reply = requests.post(base + "/api/chatkit", json=body, timeout=30)
            assert reply.status_code == 200
            assert "compose hello" in str(sse_events(reply.content))
            assert (tmp_path / "chatkit-threads.db").is_file()
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
