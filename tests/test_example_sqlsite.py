"""The second example host (``tests/example_host/sqlsite``: Flask-SQLAlchemy, Flask-Login,
CSRFProtect, Flask-Limiter with default limits) runs the chat in server mode with an agent tool
that reads the site's database for the signed-in user.

What the site relies on, through its own test client, under gunicorn and installed from the
checkout into a fresh virtualenv: the database pool's checked-out connections are back at their
starting count after 20 tool calls (and the site's pages still work); the tool sees the id the
site's user loader returned; a visitor is nobody to the tool. And the site's operations
(issue 23): ``flask chatkit usage`` and ``reset`` report and clear server mode's counters; the
site's own default limits leave the chat's routes alone; log-out hides the anonymous visitor's
threads and, with the site's adoption setting on, log-in gives them to the account (also across
two gunicorn workers); a shortened ``CHATKIT_THREAD_TTL`` and ``flask chatkit prune`` remove
older threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit")
pytest.importorskip("flask_sqlalchemy")

import redis
import requests
from flask import Flask
from flask.testing import FlaskClient
from flask_limiter.commands import cli as limiter_cli

from chatkit_flask.identity import hash_id
from chatkit_flask.testing import TEST_API_KEY, chatkit_test_config
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.conftest import REDIS_URL
from tests.example_host.sqlsite import create_app
from tests.example_host.sqlsite.extensions import chatkit, db
from tests.server_support import sse_events, user_input

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "tests" / "example_host" / "sqlsite"
URL = "/api/chatkit"
ADA = "Ada Lovelace (user 1) is on the pro plan."
GRACE = "Grace Hopper (user 2) is on the free plan."
MESSAGE = {"type": "threads.create", "params": {"input": user_input("What is my plan?")}}
COOKIE = "chatkit_session_id"


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


# ------------------------------------------------- the site's operations (issue 23)
@pytest.fixture
def make_site(chatkit_model: FakeResponses, tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """``make_site(**settings)``: the site in server mode with its own database; each one made
    is closed after the test."""
    made: list[Flask] = []

    def make(**settings: Any) -> Flask:
        site = create_app(
            chatkit_test_config(
                chatkit_model,
                SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/site.db",
                **settings,
            )
        )
        made.append(site)
        return site

    yield make
    for site in made:
        chatkit.close(site)


def send(client: FlaskClient, text: str, thread: str | None = None) -> list[dict[str, Any]]:
    """One message (a new thread, or into ``thread``), its stream read to the end."""
    if thread is None:
        body = {"type": "threads.create", "params": {"input": user_input(text)}}
    else:
        body = {
            "type": "threads.add_user_message",
            "params": {"thread_id": thread, "input": user_input(text)},
        }
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return sse_events(response.data)


def thread_ids(client: FlaskClient) -> list[str]:
    response = client.post(URL, json={"type": "threads.list", "params": {}})
    assert response.status_code == 200, response.get_data(as_text=True)
    return sorted(thread["id"] for thread in response.get_json()["data"])


def chatkit_command(site: Flask, *args: str) -> str:
    result = site.test_cli_runner().invoke(args=["chatkit", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_usage_and_reset_report_and_clear_the_sites_server_mode_counters(
    make_site: Callable[..., Flask], chatkit_model: FakeResponses, real_redis: redis.Redis
) -> None:
    site = make_site(
        RATELIMIT_ENABLED=True,
        RATELIMIT_STORAGE_URI=REDIS_URL,
        CHATKIT_RATELIMIT_PER_USER="3 per minute",
    )
    client = site.test_client()
    client.post("/login", data={"email": "ada@example.com"})
    thread = send(client, "one")[0]["thread"]["id"]
    send(client, "two", thread)
    owner = "user:" + hash_id("user:1")  # the id the site's user loader returns, as a string

    usage = chatkit_command(site, "usage", "--user", "1")
    assert f"user limits for {owner}:" in usage
    assert "messages 3 per 1 minute: 1 of 3 remaining (2 used, resets in" in usage
    assert "streams: 0 of 2 open" in usage  # both streams read to the end
    assert real_redis.keys("*")  # the counters live in the suite's Redis

    send(client, "three", thread)
    refused = send(client, "four", thread)
    assert refused[0]["type"] == "error" and "too many messages" in refused[0]["message"]
    assert "messages 3 per 1 minute: 0 of 3 remaining (3 used" in (
        chatkit_command(site, "usage", "--user", "1")
    )

    reset = chatkit_command(site, "reset", "--user", "1")
    # the message counter (used) and the stream slots (in Redis, none held)
    assert f"Cleared 2 user limit counter(s) for {owner} (1 had been used)." in reset
    assert "messages 3 per 1 minute: 3 of 3 remaining (0 used)" in (
        chatkit_command(site, "usage", "--user", "1")
    )
    chatkit_model.enqueue(Reply.call_tool("my_account"), "Pro.")
    assert send(client, "five", thread)[-1]["type"] == "thread.item.done"
    assert tool_outputs(chatkit_model)[-1] == ADA


def test_the_sites_default_limits_do_not_throttle_the_chats_routes(
    make_site: Callable[..., Flask],
) -> None:
    site = make_site(
        RATELIMIT_ENABLED=True,
        SITE_DEFAULT_LIMITS="2 per hour",
        CHATKIT_RATELIMIT_PER_USER="5 per minute",
    )
    client = site.test_client()
    assert [client.get("/").status_code for _ in range(3)] == [200, 200, 429]
    config = [client.get(f"{URL}/config").status_code for _ in range(5)]
    helper = [client.get(f"{URL}/static/chatkit-secret.js") for _ in range(5)]
    for response in helper:
        response.close()
    assert config == [200] * 5
    assert [response.status_code for response in helper] == [200] * 5
    replies = [send(client, f"message {n}")[0]["type"] for n in range(6)]
    assert replies == ["thread.created"] * 5 + ["error"]  # the chat's own limit, not the site's
    assert client.get("/").status_code == 429
    # What the operator is shown: the site's default, and the chat's routes exempt from it.
    assert "host default: 2 per 1 hour (not on the chat's routes: " in (
        chatkit_command(site, "limits")
    )
    shown = site.test_cli_runner().invoke(limiter_cli, ["limits"]).output
    routes = shown.split("chatkit.config", 1)[1].split("auth", 1)[0]
    assert "Exempt" in routes and "2 per 1 hour" not in routes


def test_log_out_hides_the_anonymous_visitors_threads(make_site: Callable[..., Flask]) -> None:
    site = make_site()  # the site's defaults: adoption off
    client = site.test_client()  # a shared computer's browser
    send(client, "asked before signing in")
    visitor = client.get_cookie(COOKIE).value
    assert len(thread_ids(client)) == 1
    client.post("/login", data={"email": "ada@example.com"})
    assert thread_ids(client) == []  # the account's own threads
    client.post("/logout")
    assert client.get_cookie(COOKIE) is None
    assert thread_ids(client) == []  # the next person at this browser is a new visitor
    assert client.get_cookie(COOKIE).value != visitor
    assert "1 thread(s)" in chatkit_command(site, "threads", "--visitor", visitor)


def test_with_adoption_on_log_in_gives_the_visitors_threads_to_the_account(
    make_site: Callable[..., Flask], chatkit_model: FakeResponses
) -> None:
    site = make_site(CHATKIT_ADOPT_VISITOR_THREADS=True)
    client = site.test_client()
    asked = sorted(send(client, text)[0]["thread"]["id"] for text in ("one", "two"))
    stranger = site.test_client()
    send(stranger, "someone else's question")

    client.post("/login", data={"email": "ada@example.com"})
    assert thread_ids(client) == asked
    chatkit_model.enqueue(Reply.call_tool("my_account"), "Pro.")
    assert send(client, "and my plan?", asked[0])[-1]["type"] == "thread.item.done"
    assert tool_outputs(chatkit_model)[-1] == ADA  # the adopted thread runs as the account
    assert "2 thread(s)" in chatkit_command(site, "threads", "--user", "1")
    client.post("/logout")
    assert thread_ids(client) == []
    elsewhere = site.test_client()  # the account's threads follow the account
    elsewhere.post("/login", data={"email": "ada@example.com"})
    assert thread_ids(elsewhere) == asked
    assert len(thread_ids(stranger)) == 1


def age_thread(store_url: str, thread_id: str, seconds: int) -> None:
    """Make a stored thread's last activity ``seconds`` older, as if written that long ago."""
    with sqlite3.connect(store_url.removeprefix("sqlite:///")) as threads:
        threads.execute(
            "UPDATE chatkit_threads SET updated_at = updated_at - ? WHERE id = ?",
            (seconds, thread_id),
        )


def test_a_shortened_ttl_and_prune_remove_older_threads(
    make_site: Callable[..., Flask], tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path}/threads.db"
    site = make_site(CHATKIT_STORE_URL=store)  # the default: 30 days
    client = site.test_client()
    old = send(client, "ten minutes ago")[0]["thread"]["id"]
    age_thread(store, old, 600)
    new = send(client, "just now")[0]["thread"]["id"]
    assert thread_ids(client) == sorted([old, new])

    shortened = make_site(CHATKIT_STORE_URL=store, CHATKIT_THREAD_TTL=60)
    pruned = chatkit_command(shortened, "prune")
    assert "Pruned 1 thread(s) inactive for CHATKIT_THREAD_TTL=60s or more." in pruned
    assert thread_ids(client) == [new]  # gone for every worker, whatever TTL it runs with


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
        FLASK_CHATKIT_TITLE_MODEL="off",  # one model call per message: the scripted tool calls
        FLASK_SITE_POOL_STATUS="true",
        OPENAI_AGENTS_DISABLE_TRACING="1",
    )
    return env


@contextlib.contextmanager
def served_site(
    fake: FakeResponses, tmp: Path, workers: int = 1, **settings: str
) -> Iterator[str]:
    """The site under ``gunicorn -k gthread --threads 8 -w <workers>``, configured through
    FLASK_* variables (``settings`` added, e.g. ``FLASK_CHATKIT_ADOPT_VISITOR_THREADS="true"``);
    yields its base URL and checks the log has no traceback once it is stopped."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp / "gunicorn.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "8",
             "-w", str(workers), "-b", f"127.0.0.1:{port}",
             "tests.example_host.sqlsite:create_app()"],
            cwd=ROOT, env={**site_env(fake, tmp), **settings}, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_up(base + "/_pool", process, log_path)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert "Traceback" not in log_path.read_text()


def both_workers_answer(base: str, workers: int = 2) -> None:
    """Wait until each worker process has answered (each request on a new connection)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 30
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"only workers {seen} answered"
        seen.add(requests.get(base + "/_pool", timeout=5).json()["worker"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_under_gunicorn_the_pool_returns_after_20_tool_calls(
    chatkit_model: FakeResponses, tmp_path: Path
) -> None:
    with served_site(chatkit_model, tmp_path) as base:
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


def browser() -> requests.Session:
    """A browser that opens a new connection per request, so two workers share its requests."""
    session = requests.Session()
    session.headers["Connection"] = "close"
    return session


def served_thread_ids(session: requests.Session, base: str) -> list[str]:
    response = session.post(base + URL, json={"type": "threads.list", "params": {}}, timeout=10)
    assert response.status_code == 200, response.text
    return sorted(thread["id"] for thread in response.json()["data"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_under_two_gunicorn_workers_log_in_adopts_and_log_out_hides_the_visitors_threads(
    chatkit_model: FakeResponses, tmp_path: Path
) -> None:
    with served_site(
        chatkit_model, tmp_path, workers=2, FLASK_CHATKIT_ADOPT_VISITOR_THREADS="true"
    ) as base:
        both_workers_answer(base)
        visitor = browser()
        asked = []
        for n in range(4):
            body = {"type": "threads.create", "params": {"input": user_input(f"question {n}")}}
            events = sse_events(visitor.post(base + URL, json=body, timeout=30).content)
            asked.append(events[0]["thread"]["id"])
        assert served_thread_ids(visitor, base) == sorted(asked)

        assert visitor.post(base + "/login", data={"email": "ada@example.com"}).ok
        for _ in range(4):  # whichever worker answers
            assert served_thread_ids(visitor, base) == sorted(asked)
        assert visitor.post(base + "/logout").ok
        for _ in range(4):
            assert served_thread_ids(visitor, base) == []
        elsewhere = browser()
        assert elsewhere.post(base + "/login", data={"email": "grace@example.com"}).ok
        assert served_thread_ids(elsewhere, base) == []
        assert elsewhere.post(base + "/logout").ok
        assert elsewhere.post(base + "/login", data={"email": "ada@example.com"}).ok
        assert served_thread_ids(elsewhere, base) == sorted(asked)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_under_two_gunicorn_workers_usage_and_reset_count_both(
    chatkit_model: FakeResponses, tmp_path: Path, real_redis: redis.Redis
) -> None:
    limits = {
        "FLASK_RATELIMIT_STORAGE_URI": REDIS_URL,
        "FLASK_CHATKIT_RATELIMIT_PER_USER": "3 per minute",
    }

    def flask_chatkit(*args: str) -> str:
        """The operator's command, run as written in the README's operations section."""
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "tests.example_host.sqlsite:create_app()",
             "chatkit", *args],
            cwd=ROOT, env={**site_env(chatkit_model, tmp_path), **limits},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    with served_site(chatkit_model, tmp_path, workers=2, **limits) as base:
        both_workers_answer(base)
        ada = browser()
        assert ada.post(base + "/login", data={"email": "ada@example.com"}).ok
        outcomes = []
        for n in range(4):
            body = {"type": "threads.create", "params": {"input": user_input(f"question {n}")}}
            events = sse_events(ada.post(base + URL, json=body, timeout=30).content)
            outcomes.append(events[0]["type"])
        assert outcomes == ["thread.created"] * 3 + ["error"]  # one limit for both workers
        assert "messages 3 per 1 minute: 0 of 3 remaining (3 used" in (
            flask_chatkit("usage", "--user", "1")
        )
        assert "(1 had been used)" in flask_chatkit("reset", "--user", "1")
        assert "messages 3 per 1 minute: 3 of 3 remaining (0 used)" in (
            flask_chatkit("usage", "--user", "1")
        )
        body = {"type": "threads.create", "params": {"input": user_input("after the reset")}}
        events = sse_events(ada.post(base + URL, json=body, timeout=30).content)
        assert events[0]["type"] == "thread.created"


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
