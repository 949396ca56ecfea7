"""Health under real gunicorn: a store the service cannot use stops the whole server (with and
without config/gunicorn.conf.py), and ``/metrics`` under a plain ``gunicorn -w 2 wsgi:app``
(no config file) adds up both workers and says so."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from chatkit_flask import metrics_dir
from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.conftest import REDIS_URL, TEST_SECRET_KEY
from tests.test_multiprocess import free_port, service_env, stop

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def server_env(store_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "GUNICORN_"))}
    env.update(
        CHATKIT_BACKEND="server",
        OPENAI_API_KEY="test-model-key-not-a-real-one",
        OPENAI_BASE_URL="http://127.0.0.1:9/v1",  # never called: start-up stops first
        SECRET_KEY=TEST_SECRET_KEY,
        CHATKIT_STORE_URL=store_url,
        RATELIMIT_STORAGE_URI="memory://",
        GUNICORN_WORKERS="2",
        GUNICORN_BIND=f"127.0.0.1:{free_port()}",
    )
    return env


@pytest.mark.parametrize(
    "command",
    [
        ["-c", "config/gunicorn.conf.py", "wsgi:app"],
        ["-w", "2", "-k", "gthread", "-b", "127.0.0.1:0", "wsgi:app"],  # no config file
    ],
    ids=["with-config", "plain"],
)
def test_an_unusable_store_stops_gunicorn_naming_the_key_and_cause(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", *command],
        cwd=ROOT, env=server_env("sqlite:////proc/chatkit-threads.db"),
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    # 4 (APP_LOAD_ERROR) normally; gunicorn exits 1 when its second worker fails while it halts.
    assert result.returncode in (1, 4), result.stderr[-2000:]
    assert (
        "configuration error: CHATKIT_STORE_URL: the sqlite store cannot be used: "
        "cannot create chatkit-threads.db in /proc" in result.stderr
    ), result.stderr[-2000:]
    assert "App failed to load." in result.stderr  # the master stopped: no restart loop


def test_check_cannot_run_when_start_up_refuses_the_store() -> None:
    """``flask chatkit check`` loads the app: a store start-up refuses is exit 4, named."""
    env = server_env(f"redis://127.0.0.1:{free_port()}/0")
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "chatkit", "check"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 4, result.stdout + result.stderr
    assert (
        "configuration error: CHATKIT_STORE_URL: the redis store cannot be used: "
        "cannot connect to Redis" in result.stderr
    ), result.stderr


def _scrape(base: str) -> str:
    with requests.Session() as session:  # a new connection: any worker may answer
        return session.get(base + "/metrics", timeout=5).text


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def plain_gunicorn(
    real_redis: object, upstream: FakeChatKit, tmp_path: Path
) -> Iterator[tuple[str, int]]:
    """``gunicorn -w 2 wsgi:app``: no config file, no PROMETHEUS_MULTIPROC_DIR."""
    env = service_env(upstream, CHATKIT_RATELIMIT_PER_IP="1000 per minute",
                      CHATKIT_RATELIMIT_PER_USER="1000 per minute", CHATKIT_BACKEND="hosted",
                      RATELIMIT_STORAGE_URI=REDIS_URL, CHATKIT_LOG_LEVEL="info")  # fmt: skip
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    log = open(log_path, "wb")  # noqa: SIM115 (open for the server's whole life)
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "2", "--threads", "4",
         "-b", f"127.0.0.1:{port}", "wsgi:app"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        process.kill()
        raise RuntimeError(log_path.read_text())
    yield base, process.pid
    stop(process)
    log.close()
    shutil.rmtree(
        Path(tempfile.gettempdir()) / f"chatkit-prometheus-{os.getuid()}-{process.pid}",
        ignore_errors=True,
    )


def test_metrics_add_up_every_worker_without_the_config_file(
    plain_gunicorn: tuple[str, int],
) -> None:
    base, master = plain_gunicorn
    directory = Path(tempfile.gettempdir()) / f"chatkit-prometheus-{os.getuid()}-{master}"

    def workers() -> set[str]:
        return {p.name.rsplit("_", 1)[1] for p in directory.glob("counter_*.db")}

    # Until both workers have minted (one connection each; the second worker may still be
    # loading the app when the first answers), at least 24 mints.
    mints = 0
    deadline = time.monotonic() + 30
    while mints < 24 or len(workers()) < 2:
        assert time.monotonic() < deadline, sorted(directory.iterdir())
        with requests.Session() as session:
            response = session.post(base + "/api/chatkit/secret", json={}, timeout=10)
            assert response.status_code == 200
        mints += 1
    for _ in range(6):  # whichever worker answers the scrape
        text = _scrape(base)
        assert _value(text, 'chatkit_mints_total{outcome="minted"}') == mints
        assert _value(text, "chatkit_metrics_multiprocess") == 1
    assert len(workers()) == 2  # both workers wrote their counters


# ------------------------------------------------------- the shared directory, in-process


@pytest.fixture
def as_gunicorn_worker(monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process made to look like a gunicorn worker that has not imported
    prometheus-client yet, with a private temp dir."""
    temp = Path(tempfile.mkdtemp(prefix="chatkit-health-"))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("SERVER_SOFTWARE", "gunicorn/27.0.1")
    for name in ("PROMETHEUS_MULTIPROC_DIR", metrics_dir.ADOPTED_ENV):
        monkeypatch.setenv(name, "")  # records what to restore: adopting sets both
        monkeypatch.delenv(name)
    monkeypatch.delitem(sys.modules, "prometheus_client", raising=False)
    monkeypatch.setattr(metrics_dir, "_in_worker", lambda: True)
    yield temp
    shutil.rmtree(temp)


def test_a_directory_left_by_an_earlier_master_is_emptied_once(
    as_gunicorn_worker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = as_gunicorn_worker / f"chatkit-prometheus-{os.getuid()}-{os.getppid()}"
    directory.mkdir()
    (directory / "master").write_text(f"{os.getppid()} 1")  # same pid, another start time
    (directory / "counter_4242.db").write_bytes(b"old totals")

    assert metrics_dir.adopt_gunicorn_metrics_dir() == str(directory)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(directory)
    assert not (directory / "counter_4242.db").exists()

    (directory / "counter_4343.db").write_bytes(b"a sibling worker's values")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert metrics_dir.adopt_gunicorn_metrics_dir() == str(directory)  # the next worker
    assert (directory / "counter_4343.db").exists()


def test_outside_gunicorn_nothing_changes(
    as_gunicorn_worker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SERVER_SOFTWARE")
    assert metrics_dir.adopt_gunicorn_metrics_dir() is None
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert list(as_gunicorn_worker.iterdir()) == []


def test_directories_of_masters_that_exited_are_removed(as_gunicorn_worker: Path) -> None:
    uid = os.getuid()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid nobody has now
    dead = as_gunicorn_worker / f"chatkit-prometheus-{uid}-{gone.pid}"
    alive = as_gunicorn_worker / f"chatkit-prometheus-{uid}-{os.getpid()}"
    unrelated = as_gunicorn_worker / f"chatkit-prometheus-{uid}-{gone.pid}0"  # no marker
    for directory in (dead, alive, unrelated):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"x")
    for directory in (dead, alive):
        (directory / "master").write_text("1 1")

    adopted = Path(metrics_dir.adopt_gunicorn_metrics_dir() or "")
    assert adopted.is_dir()
    assert not dead.exists()
    assert alive.exists() and unrelated.exists()
