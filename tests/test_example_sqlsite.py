"""The second example host (``tests/example_host/sqlsite``: Flask-SQLAlchemy, Flask-Login,
CSRFProtect, Flask-Limiter with default limits) runs the chat in server mode with an agent tool
that reads the site's database for the signed-in user.

What the site relies on, through its own test client, under gunicorn and installed from the
checkout into a fresh virtualenv: the database pool's checked-out connections are back at their
starting count after 20 tool calls (and the site's pages still work); the tool sees the id the
site's user loader returned; a visitor is nobody to the tool.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit")
pytest.importorskip("flask_sqlalchemy")

import requests
from flask import Flask

from chatkit_flask.testing import TEST_API_KEY, chatkit_test_config
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.example_host.sqlsite import create_app
from tests.example_host.sqlsite.extensions import chatkit, db
from tests.server_support import sse_events, user_input

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "tests" / "example_host" / "sqlsite"
URL = "/api/chatkit"
ADA = "Ada Lovelace (user 1) is on the pro plan."
GRACE = "Grace Hopper (user 2) is on the free plan."
MESSAGE = {"type": "threads.create", "params": {"input": user_input("What is my plan?")}}


def tool_outputs(fake: FakeResponses) -> list[str]:
    return [
        item["output"]
        for request in fake.requests
        for item in (request.json or {}).get("input", [])
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    ]


@pytest.fixture
def app(chatkit_model: FakeResponses, tmp_path: Path) -> Iterator[Flask]:
    site = create_app(
        chatkit_test_config(chatkit_model, SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/site.db")
    )
    yield site
    chatkit.close(site)


def checked_out(app: Flask) -> int:
    with app.app_context():
        return db.engine.pool.checkedout()


# ------------------------------------------------------------- test client
def test_pool_connections_return_after_20_tool_calls(
    app: Flask, chatkit_model: FakeResponses
) -> None:
    client = app.test_client()
    assert client.post("/login", data={"email": "ada@example.com"}).status_code == 200
    start = checked_out(app)
    for _ in range(20):
        chatkit_model.enqueue(Reply.call_tool("my_account"), "You are on the pro plan.")
        events = sse_events(client.post(URL, json=MESSAGE).data)
        assert events[-1]["item"]["content"][0]["text"] == "You are on the pro plan."
        assert checked_out(app) == start
    assert tool_outputs(chatkit_model) == [ADA] * 20
    assert client.get("/account").get_json() == {"name": "Ada Lovelace", "plan": "pro"}


def test_the_tool_sees_the_user_the_site_signed_in(
    app: Flask, chatkit_model: FakeResponses
) -> None:
    client = app.test_client()
    client.post("/login", data={"email": "grace@example.com"})
    chatkit_model.enqueue(Reply.call_tool("my_account"), "Noted.")
    client.post(URL, json=MESSAGE).get_data()
    client.post("/logout")
    chatkit_model.enqueue(Reply.call_tool("my_account"), "Noted.")
    client.post(URL, json=MESSAGE).get_data()
    assert tool_outputs(chatkit_model) == [GRACE, "The visitor is not signed in."]


def test_twenty_sites_created_and_closed_leave_no_threads(
    chatkit_model: FakeResponses, tmp_path: Path
) -> None:
    before = set(threading.enumerate())
    for n in range(20):
        site = create_app(
            chatkit_test_config(
                chatkit_model, SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/site{n}.db"
            )
        )
        client = site.test_client()
        client.post("/login", data={"email": "ada@example.com"})
        chatkit_model.enqueue(Reply.call_tool("my_account"), "Pro.")
        client.post(URL, json=MESSAGE).get_data()
        chatkit.close(site)
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) - before == set()
    assert tool_outputs(chatkit_model) == [ADA] * 20


# ---------------------------------------------------------------- gunicorn
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def site_env(fake: FakeResponses, tmp: Path) -> dict[str, str]:
    """The site's settings as ``create_app()`` reads them without a test config: FLASK_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "CHATKIT_"))}
    env.update(
        FLASK_SECRET_KEY="example-site-secret-key-0123456789-abcdef",
        FLASK_SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp}/site.db",
        FLASK_OPENAI_API_KEY=TEST_API_KEY,
        FLASK_OPENAI_BASE_URL=fake.base_url,
        FLASK_CHATKIT_STORE_URL=f"sqlite:///{tmp}/threads.db",
        FLASK_CHATKIT_COOKIE_SECURE="false",
        FLASK_RATELIMIT_STORAGE_URI="memory://",
        FLASK_CHATKIT_RATELIMIT_PER_USER="100 per minute",  # the default 10 is under 20
        FLASK_SITE_POOL_STATUS="true",
        OPENAI_AGENTS_DISABLE_TRACING="1",
    )
    return env


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_under_gunicorn_the_pool_returns_after_20_tool_calls(
    chatkit_model: FakeResponses, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-w", "1",
             "-b", f"127.0.0.1:{port}", "tests.example_host.sqlsite:create_app()"],
            cwd=ROOT, env=site_env(chatkit_model, tmp_path), stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_up(base + "/_pool", process, log_path)
        session = requests.Session()
        assert session.post(base + "/login", data={"email": "ada@example.com"}).ok
        start = session.get(base + "/_pool").json()["checked_out"]
        for _ in range(20):
            chatkit_model.enqueue(Reply.call_tool("my_account"), "Pro.")
            response = session.post(base + URL, json=MESSAGE, timeout=30)
            assert sse_events(response.content)[-1]["type"] == "thread.item.done", response.text
        assert session.get(base + "/_pool").json()["checked_out"] == start
        assert tool_outputs(chatkit_model) == [ADA] * 20
        assert session.get(base + "/account").json()["plan"] == "pro"
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert "Traceback" not in log_path.read_text()


def wait_until_up(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(log_path.read_text())
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the site did not start:\n" + log_path.read_text())


# ------------------------------------------------- installed from the checkout
INSTALLED_CHECK = """
import json, tempfile
from chatkit_flask.testing import chatkit_test_config
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
import chatkit_flask, sqlsite
from sqlsite.extensions import chatkit, db

with FakeResponses() as fake:
    app = sqlsite.create_app(chatkit_test_config(
        fake, SQLALCHEMY_DATABASE_URI=f"sqlite:///{tempfile.mkdtemp()}/site.db"))
    client = app.test_client()
    client.post("/login", data={"email": "ada@example.com"})
    with app.app_context():
        pool = db.engine.pool
    start = pool.checkedout()
    for _ in range(20):
        fake.enqueue(Reply.call_tool("my_account"), "Pro.")
        client.post("/api/chatkit", json={"type": "threads.create", "params": {"input": {
            "content": [{"type": "input_text", "text": "plan?"}], "attachments": [],
            "inference_options": {}}}}).get_data()
    outputs = [i["output"] for r in fake.requests for i in r.json["input"]
               if isinstance(i, dict) and i.get("type") == "function_call_output"]
    chatkit.close()
    print(json.dumps({"package": chatkit_flask.__file__, "start": start,
                      "end": pool.checkedout(), "outputs": outputs}))
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_installed_from_the_checkout_into_a_fresh_virtualenv(tmp_path: Path) -> None:
    """``pip install --no-deps`` of a copy of the checkout (its build backend from the package
    index, as for any site) into a new venv that sees the dependencies through a .pth file,
    then the site run from a directory outside the checkout: only the installed package is
    importable."""
    source = tmp_path / "checkout"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "chatkit_flask", source / "chatkit_flask",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    deps = sysconfig.get_paths()["purelib"]  # this suite's environment, after the venv's own
    (Path(purelib) / "suite-dependencies.pth").write_text(deps + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", str(source)],
        check=True, cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    workdir = tmp_path / "site"
    shutil.copytree(SITE, workdir / "sqlsite", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
    result = subprocess.run(
        [python, "-c", INSTALLED_CHECK], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["package"].startswith(purelib)  # the installed copy, not the checkout
    assert report["start"] == report["end"] == 0
    assert report["outputs"] == [ADA] * 20


# ------------------------------------------------------------ README as written
README_POOL_CHECK = '''
from chatkit_flask.testing.fake_responses import Reply
from myshop.extensions import db

def test_no_pooled_connection_outlives_a_message(app, chatkit_model):
    client = app.test_client()
    client.post("/login", data={"email": "ada@example.com"})
    with app.app_context():
        pool = db.engine.pool
    start = pool.checkedout()
    for _ in range(20):
        chatkit_model.enqueue(Reply.call_tool("my_account"), "Pro.")
        client.post("/api/chatkit", json={"type": "threads.create", "params": {"input": {
            "content": [{"type": "input_text", "text": "plan?"}], "attachments": [],
            "inference_options": {}}}}).get_data()
        assert pool.checkedout() == start
'''


def readme_block(after_heading: str, index: int = 0) -> str:
    """The ``index``-th python block of the README section under ``after_heading``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(after_heading, 1)[1].split("\n### ", 1)[0]
    return section.split("```python\n")[index + 1].split("```", 1)[0]


@pytest.mark.timeout(120)
def test_the_readme_site_code_and_testing_sections_run_as_written(tmp_path: Path) -> None:
    """The README's tool (as myshop/agent.py of a site like sqlsite) and its server-mode test
    suite, run by pytest in a directory of their own."""
    shop = tmp_path / "myshop"
    shutil.copytree(SITE, shop, ignore=shutil.ignore_patterns("__pycache__"))
    agent = readme_block("### Site code in server mode")
    assert "CHATKIT_AGENT" in agent and "@function_tool" in agent
    (shop / "agent.py").write_text(agent)
    conftest, test_chat = readme_block("### Testing your site's chat").split("# test_chat.py\n")
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_chat.py").write_text(test_chat)
    (tmp_path / "test_pool.py").write_text(README_POOL_CHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "CHATKIT_"))}
    env.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", OPENAI_AGENTS_DISABLE_TRACING="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
