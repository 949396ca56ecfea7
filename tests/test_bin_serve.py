"""`bin/serve` on a fresh checkout whose `.env` holds only OPENAI_API_KEY and SECRET_KEY (plus
the fake model's address): it installs the package into its venv, listens on 127.0.0.1 only,
serves the demo page and answers a chat in server mode, threads in var/.

The checkout is the working tree's tracked files; its `.venv` is new but sees this suite's
installed requirements through a .pth file (the requirements install would otherwise take
minutes), so `bin/serve` only adds the package itself (`pip install --no-deps -e .`, which
fetches the build backend from the package index)."""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("chatkit")

import requests

from chatkit_flask.testing.fake_responses import FakeResponses
from tests.conftest import REDIS_URL, TEST_API_KEY
from tests.server_support import sse_events, user_input
from tests.test_multiprocess import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def fresh_checkout(target: Path) -> Path:
    """The tracked files of the working tree, as `git clone` of a commit of them would give."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def venv_sharing_this_one(checkout: Path) -> None:
    """A new .venv for the checkout that sees this interpreter's packages (a .pth file), with
    .ci/setup.sh's requirements stamp written: the requirements are there already."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(checkout / ".venv")], check=True)
    purelib = subprocess.run(
        [str(checkout / ".venv" / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    ours = [path for path in site.getsitepackages() if path.endswith("site-packages")]
    Path(purelib, "zz_shared_requirements.pth").write_text("\n".join(ours) + "\n")
    digest = subprocess.run(
        ["sha256sum", "requirements.txt"], cwd=checkout, capture_output=True, text=True, check=True
    ).stdout.split()[0]
    (checkout / ".venv" / ".requirements.sha256").write_text(digest + "\n")


@pytest.fixture
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=TEST_API_KEY) as server:
        yield server


def test_bin_serve_on_a_fresh_checkout_with_two_keys_serves_a_server_mode_chat(
    fake: FakeResponses, tmp_path: Path, real_redis: object
) -> None:
    checkout = fresh_checkout(tmp_path / "checkout")
    venv_sharing_this_one(checkout)
    (checkout / ".env").write_text(
        f"OPENAI_API_KEY={TEST_API_KEY}\n"
        "SECRET_KEY=fresh-checkout-secret-key-0123456789abcdef\n"
        f"OPENAI_BASE_URL={fake.base_url}\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHATKIT_", "GUNICORN_", "RATELIMIT_", "OPENAI_"))}  # fmt: skip
    env.pop("HOST", None)
    env.pop("VIRTUAL_ENV", None)
    # The suite's Redis, not the one bin/serve would default to on :6379.
    env.update(PORT=str(port), RATELIMIT_STORAGE_URI=REDIS_URL, OPENAI_AGENTS_DISABLE_TRACING="1")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["bin/serve"], cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # the package install fetches setuptools once
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if requests.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        output = log_path.read_text()
        assert f"Listening at: http://127.0.0.1:{port}" in output  # loopback only
        assert "server backend (the default" in output

        page = requests.get(base + "/", timeout=10)
        assert page.status_code == 200 and "<openai-chatkit" in page.text, page.text[:300]
        body = {"type": "threads.create", "params": {"input": user_input("fresh checkout hi")}}
        reply = requests.post(base + "/api/chatkit", json=body, timeout=30)
        assert reply.status_code == 200
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        assert "fresh checkout hi" in str(sse_events(reply.content))
        assert (checkout / "var" / "chatkit-threads.db").is_file()

        installed = subprocess.run(
            [str(checkout / ".venv" / "bin" / "python"), "-c",
             "import importlib.metadata as m, chatkit_flask as c; "
             "print(m.version('chatkit-flask'), c.__file__)"],
            cwd=tmp_path, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        assert installed[1] == str(checkout / "chatkit_flask" / "__init__.py")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
