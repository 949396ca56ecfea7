"""What a newcomer meets: server mode is the default, and a site with only OPENAI_API_KEY and
SECRET_KEY starts wherever the package is installed and whatever its working directory: threads
in the app's instance folder, default instructions shipped in the package (an instance folder's
own file first), one start-up line naming the backend and why, and a refusal to run under
gunicorn's sync worker, which would kill a long reply mid-stream."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit")

import requests
from flask import Flask

from chatkit_flask import ChatKit
from chatkit_flask.settings import ConfigError
from chatkit_flask.testing.fake_responses import FakeResponses
from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.server_support import sse_events, user_input
from tests.test_multiprocess import free_port

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_INSTRUCTIONS = ROOT / "chatkit_flask" / "server" / "instructions.md"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=TEST_API_KEY) as server:
        yield server


def two_keys(fake: FakeResponses, **extra: object) -> dict[str, object]:
    """All a site sets: the two keys (and where the fake model is); no backend, no store."""
    return {
        "OPENAI_API_KEY": TEST_API_KEY,
        "SECRET_KEY": TEST_SECRET_KEY,
        "OPENAI_BASE_URL": fake.base_url,
        "CHATKIT_COOKIE_SECURE": False,
        "TESTING": True,
        **extra,
    }


def host_app(instance: Path, config: dict[str, object]) -> Flask:
    app = Flask("fresh_site", instance_path=str(instance))
    app.config.update(config)
    ChatKit(app)
    return app


def close(app: Flask) -> None:
    app.extensions["chatkit"].server.bridge.close()


def chat(app: Flask, text: str) -> list[dict]:
    response = app.test_client().post(
        "/api/chatkit", json={"type": "threads.create", "params": {"input": user_input(text)}}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return sse_events(response.get_data())


def answer_call(fake: FakeResponses) -> Any:
    """The last answer's model request (a new thread's title call comes after it)."""
    return [r.json for r in fake.requests if r.json and r.json.get("stream")][-1]


def test_a_host_app_naming_no_store_keeps_threads_in_its_instance_folder(
    fake: FakeResponses, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not relative to the working directory (Flask's convention for an app's own files)."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    instance = tmp_path / "instance"  # not there yet: created, as Flask leaves to the app
    app = host_app(instance, two_keys(fake))
    try:
        assert app.extensions["chatkit"].settings.backend == "server"
        events = chat(app, "hello from the instance folder")
        assert "hello from the instance folder" in str(events)
        assert (instance / "chatkit-threads.db").is_file()
        assert list(elsewhere.iterdir()) == []
    finally:
        close(app)


def test_instructions_in_the_instance_folder_come_before_the_shipped_default(
    fake: FakeResponses, tmp_path: Path
) -> None:
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "instructions.md").write_text("Answer like a lighthouse keeper.")
    app = host_app(instance, two_keys(fake))
    try:
        fake.clear()
        chat(app, "hi")
        assert answer_call(fake)["instructions"] == "Answer like a lighthouse keeper."
    finally:
        close(app)
    (instance / "instructions.md").unlink()
    app = host_app(instance, two_keys(fake))
    try:
        fake.clear()
        chat(app, "hi")
        shipped = SHIPPED_INSTRUCTIONS.read_text(encoding="utf-8")
        assert answer_call(fake)["instructions"] == shipped
    finally:
        close(app)


def test_a_missing_instructions_file_names_every_place_it_looked(
    fake: FakeResponses, tmp_path: Path
) -> None:
    instance = tmp_path / "instance"
    with pytest.raises(ConfigError) as caught:
        host_app(instance, two_keys(fake, CHATKIT_AGENT_INSTRUCTIONS="@voice.md"))
    message = str(caught.value)
    assert caught.value.key == "CHATKIT_AGENT_INSTRUCTIONS"
    for folder in (instance, ROOT / "config", SHIPPED_INSTRUCTIONS.parent):
        assert str(folder / "voice.md") in message, message


def test_start_up_says_which_backend_runs_and_why(fake: FakeResponses, tmp_path: Path) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("chatkit_flask")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        close(host_app(tmp_path / "a", two_keys(fake)))
        host_app(tmp_path / "b", two_keys(fake, CHATKIT_WORKFLOW_ID="wf_legacy_site"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [r.getMessage() for r in records if " backend (" in r.getMessage()]
    assert lines == [
        "chatkit_flask: server backend (the default: CHATKIT_BACKEND and CHATKIT_WORKFLOW_ID "
        "are unset)",
        "chatkit_flask: hosted backend (CHATKIT_BACKEND is unset and CHATKIT_WORKFLOW_ID is set)",
    ]


def _install_like_pip(target: Path) -> None:
    """Copy what a wheel of this project holds (pyproject's packages and package-data) into
    ``target``, as pip would into site-packages: no config/, no var/ beside it."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = setup.get("package-data", {})
    for package in setup["packages"]:
        source = ROOT / package.replace(".", "/")
        dest = target / package.replace(".", "/")
        dest.mkdir(parents=True, exist_ok=True)
        patterns = ["*.py", *data.get(package, [])]
        for pattern in patterns:
            for path in source.glob(pattern):
                if path.is_file():
                    (dest / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, dest / path.relative_to(source))


def test_an_installed_site_starts_and_answers_on_the_defaults(
    fake: FakeResponses, tmp_path: Path
) -> None:
    """Issue 23 item 3: the package installed elsewhere, the site's cwd elsewhere again; with the
    two keys only, it starts, answers through the model with the shipped instructions, and
    keeps its threads in its instance folder."""
    site_packages = tmp_path / "site-packages"
    _install_like_pip(site_packages)
    workdir = tmp_path / "somewhere"
    workdir.mkdir()
    script = textwrap.dedent(
        f"""
        import json, os
        from flask import Flask
        from chatkit_flask import ChatKit
        app = Flask("installed_site", instance_path={str(tmp_path / "instance")!r})
        app.config.update(OPENAI_API_KEY=os.environ["KEY"], SECRET_KEY="{TEST_SECRET_KEY}",
                          OPENAI_BASE_URL=os.environ["BASE"], CHATKIT_COOKIE_SECURE=False)
        ChatKit(app)
        body = {{"type": "threads.create", "params": {{"input": {{"content": [
            {{"type": "input_text", "text": "ping from an installed site"}}],
            "attachments": [], "inference_options": {{}}}}}}}}
        reply = app.test_client().post("/api/chatkit", json=body)
        print(reply.status_code, "ping from an installed site" in reply.get_data(as_text=True))
        import chatkit_flask
        print(chatkit_flask.__file__)
        """
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(site_packages),
        "KEY": TEST_API_KEY,
        "BASE": fake.base_url,
    }
    fake.clear()
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    status, answered, module = result.stdout.split()
    assert (status, answered) == ("200", "True")
    assert module.startswith(str(site_packages))  # not the checkout
    shipped = SHIPPED_INSTRUCTIONS.read_text(encoding="utf-8")
    assert answer_call(fake)["instructions"] == shipped
    assert (tmp_path / "instance" / "chatkit-threads.db").is_file()
    assert list(workdir.iterdir()) == []


# ----------------------------------------------------- gunicorn worker class (issue 23 item 11)

SITE_MODULE = """
import os
from flask import Flask
from chatkit_flask import ChatKit

def create_app():
    app = Flask(__name__, instance_path=os.environ["SITE_INSTANCE"])
    app.config.update(OPENAI_API_KEY=os.environ["SITE_KEY"], SECRET_KEY=os.environ["SITE_SECRET"],
                      OPENAI_BASE_URL=os.environ["SITE_MODEL"], CHATKIT_COOKIE_SECURE=False)
    ChatKit(app)
    return app
"""


def _gunicorn(tmp_path: Path, fake: FakeResponses, *args: str) -> tuple[subprocess.Popen, int]:
    (tmp_path / "fresh_site_app.py").write_text(SITE_MODULE)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "GUNICORN_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        SITE_INSTANCE=str(tmp_path / "instance"),
        SITE_KEY=TEST_API_KEY,
        SITE_SECRET=TEST_SECRET_KEY,
        SITE_MODEL=fake.base_url,
        OPENAI_AGENTS_DISABLE_TRACING="1",
    )
    command = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", *args,
               "fresh_site_app:create_app()"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return process, port


@pytest.mark.slow
def test_plain_gunicorn_with_sync_workers_refuses_server_mode_naming_the_fix(
    fake: FakeResponses, tmp_path: Path
) -> None:
    """`gunicorn -w 2 'site:create_app()'` gives sync workers, which kill a reply that outlasts
    the 30 s timeout: the workers refuse to boot and gunicorn exits, saying what to run."""
    process, _port = _gunicorn(tmp_path, fake, "-w", "2")
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0, output
    assert "worker_class: server mode cannot run under gunicorn's sync worker" in output
    assert "--worker-class gthread" in output
    assert TEST_API_KEY not in output


@pytest.mark.slow
def test_gunicorn_with_gthread_workers_serves_server_mode(
    fake: FakeResponses, tmp_path: Path
) -> None:
    """The fix the refusal names works: the same app under gthread workers answers a chat."""
    process, port = _gunicorn(tmp_path, fake, "-w", "2", "--worker-class", "gthread",
                              "--threads", "4")  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                requests.get(f"http://127.0.0.1:{port}/api/chatkit/config", timeout=5)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
        body = {"type": "threads.create", "params": {"input": user_input("through gthread")}}
        reply = requests.post(f"http://127.0.0.1:{port}/api/chatkit", json=body, timeout=30)
        assert reply.status_code == 200
        assert "through gthread" in str(sse_events(reply.content))
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_the_offline_demo_runs_server_mode_by_default(tmp_path: Path) -> None:
    """`python -m chatkit_flask.demo` with no flag: a chat with the fake model, no key."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "OPENAI_"))}
    env["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
    process = subprocess.Popen(
        [sys.executable, "-m", "chatkit_flask.demo", "--port", str(port), "--token-delay", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 40
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                config = requests.get(base + "/api/chatkit/config", timeout=5)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, "the demo did not start"
                time.sleep(0.2)
        assert config.json()["backend"] == "server"
        body = {"type": "threads.create", "params": {"input": user_input("demo default")}}
        reply = requests.post(base + "/api/chatkit", json=body, timeout=30)
        assert "demo default" in str(sse_events(reply.content))
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
