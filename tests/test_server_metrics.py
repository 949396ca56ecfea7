"""Server mode's metrics and log line: values after real requests through the test client with
the fake model (completed, failed, cancelled, refused, not found, invalid), the open-streams
gauge back at 0 however a stream ends, labels that never hold an id or a text, and the gauge and
counters summed across gunicorn workers.

The tests of what the store does (a message's store calls, a missing thread, a cut answer saved,
the store's own failures counted) run on every thread store (``store_url``); the rest keep
threads in SQLite, as does the gunicorn test (test_server_gunicorn runs workers on every store)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from chatkit_flask.service import create_app
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.conftest import TEST_SECRET_KEY

MODEL_KEY = "test-model-key-not-a-real-one"
URL = "/api/chatkit"
SECRET_TEXT = "zebra-quartz-7f3e"  # a word that must never show in a label


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Differences of metric values since construction (the registry is process-wide)."""

    def __init__(self) -> None:
        self.before = self._all()

    @staticmethod
    def _all() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in REGISTRY.collect()
            if family.name.startswith("chatkit_")
            for sample in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return value(name, **labels) - self.before.get(key, 0.0)


def user_input(text: str) -> dict[str, Any]:
    return {"content": [{"type": "input_text", "text": text}], "attachments": [],
            "inference_options": {}}  # fmt: skip


def create(text: str = "hello") -> dict[str, Any]:
    return {"type": "threads.create", "params": {"input": user_input(text)}}


def add_message(thread_id: str, text: str) -> dict[str, Any]:
    return {"type": "threads.add_user_message",
            "params": {"thread_id": thread_id, "input": user_input(text)}}  # fmt: skip


def events(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(c[6:]) for c in body.decode().split("\n\n") if c.startswith("data: ")]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=MODEL_KEY) as server:
        yield server


@pytest.fixture
def make_server_app(fake: FakeResponses, tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    fake.clear()
    fake.token_delay = 0.0
    apps: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        config: dict[str, Any] = {
            "CHATKIT_BACKEND": "server",
            "OPENAI_API_KEY": MODEL_KEY,
            "OPENAI_BASE_URL": fake.base_url,
            "CHATKIT_TITLE_MODEL": "off",  # one model call per message
            "SECRET_KEY": TEST_SECRET_KEY,
            "CHATKIT_STORE_URL": f"sqlite:///{tmp_path}/threads-{len(apps)}.db",
            "CHATKIT_COOKIE_SECURE": False,
            "RATELIMIT_STORAGE_URI": "memory://",
            "TESTING": True,
        }
        config.update(overrides)
        app = create_app(config, environ={})
        apps.append(app)
        return app

    yield factory
    fake.token_delay = 0.0
    for app in apps:
        app.extensions["chatkit"].server.bridge.close()


def post(client: FlaskClient, body: dict[str, Any], **kwargs: Any) -> Any:
    """The response read to its end and closed, as a WSGI server does (``buffered=False``:
    the caller reads and closes)."""
    kwargs.setdefault("buffered", True)
    return client.post(URL, json=body, **kwargs)


# ---------------------------------------------------------------------- in-process


def test_completed_message(
    make_server_app: Callable[..., Flask], mint_logs: Any, store_url: str
) -> None:
    client = make_server_app(CHATKIT_STORE_URL=store_url).test_client()
    delta = Delta()
    response = post(client, create("hello there"))
    assert response.status_code == 200
    assert events(response.data)[-1]["item"]["content"][0]["text"] == "You said: hello there"

    assert delta("chatkit_messages_total", outcome="completed") == 1
    assert delta("chatkit_requests_total", type="threads.create") == 1
    assert delta("chatkit_first_event_seconds_count") == 1
    assert delta("chatkit_first_answer_seconds_count") == 1
    assert delta("chatkit_stream_duration_seconds_count") == 1
    assert delta("chatkit_streams_open") == 0
    assert delta("chatkit_model_errors_total") == 0
    assert delta("chatkit_store_errors_total") == 0
    # Tokens counted from the answer's usage: the same figures as its log line.
    (line,) = [r for r in mint_logs.records if r.name == "chatkit_flask.message"]
    fields = line.chatkit
    assert fields["tokens_in"] > 0 and fields["tokens_out"] > 0
    assert delta("chatkit_model_tokens_total", kind="input") == fields["tokens_in"]
    assert delta("chatkit_model_tokens_total", kind="output") == fields["tokens_out"]


def test_failed_answer_is_a_model_error(
    make_server_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    client = make_server_app().test_client()
    fake.enqueue(Reply.error(500))
    delta = Delta()
    response = post(client, create())
    assert response.status_code == 200
    assert events(response.data)[-1]["type"] == "error"
    assert delta("chatkit_messages_total", outcome="failed") == 1
    assert delta("chatkit_first_answer_seconds_count") == 0  # the model never answered
    assert delta("chatkit_model_errors_total") == 1
    assert delta("chatkit_messages_total", outcome="completed") == 0
    assert delta("chatkit_streams_open") == 0


def test_closed_stream_is_cancelled_and_the_gauge_returns_to_zero(
    make_server_app: Callable[..., Flask], fake: FakeResponses, store_url: str
) -> None:
    client = make_server_app(CHATKIT_STORE_URL=store_url).test_client()
    fake.token_delay = 0.1
    delta = Delta()
    response = post(client, create(" ".join(f"w{n}" for n in range(40))), buffered=False)
    chunks = iter(response.response)
    received = b""
    while b"text_delta" not in received:  # the answer has begun
        received += next(chunks)
    assert delta("chatkit_streams_open") == 1
    response.close()  # what gunicorn does when the visitor goes away
    assert delta("chatkit_streams_open") == 0
    assert delta("chatkit_messages_total", outcome="cancelled") == 1
    assert delta("chatkit_stream_duration_seconds_count") == 1
    assert delta("chatkit_first_event_seconds_count") == 1
    assert delta("chatkit_model_errors_total") == 0
    # What the visitor read is saved after the stream ends (a failed write would count here).
    (thread,) = post(client, {"type": "threads.list", "params": {}}).get_json()["data"]
    body = {"type": "items.list", "params": {"thread_id": thread["id"], "order": "asc"}}
    deadline = time.monotonic() + 5
    while len(kinds := [i["type"] for i in post(client, body).get_json()["data"]]) < 2:
        assert time.monotonic() < deadline, kinds
        time.sleep(0.05)
    assert kinds == ["user_message", "assistant_message"]
    assert delta("chatkit_store_errors_total") == 0


def test_refusals_by_scope(make_server_app: Callable[..., Flask], fake: FakeResponses) -> None:
    app = make_server_app(
        CHATKIT_RATELIMIT_PER_USER="3 per minute",  # a message refused by a slot counts too
        CHATKIT_RATELIMIT_REQUESTS_PER_IP="5 per minute",
        CHATKIT_MAX_STREAMS_PER_USER=1,
    )
    client = app.test_client()
    delta = Delta()
    # A reply on the way holds the visitor's only stream slot.
    fake.token_delay = 0.1
    held = post(client, create(" ".join(["word"] * 30)), buffered=False)
    next(iter(held.response))
    busy = post(client, create())
    held.close()
    fake.token_delay = 0.0
    assert events(busy.data)[0]["type"] == "error"
    assert delta("chatkit_refused_total", scope="streams") == 1
    # The third message uses the per-user limit up, the fourth is refused by it.
    assert events(post(client, create()).data)[-1]["type"] == "thread.item.done"
    over = post(client, create())
    assert over.status_code == 200 and events(over.data)[0]["type"] == "error"
    assert delta("chatkit_refused_total", scope="user") == 1
    # Reads are refused by the per-IP request limit (5 requests; the refused message did not
    # reach that rule).
    reads = [post(client, {"type": "threads.list", "params": {}}) for _ in range(3)]
    assert [read.status_code for read in reads] == [200, 200, 429]
    assert delta("chatkit_refused_total", scope="requests") == 1

    assert delta("chatkit_messages_total", outcome="refused") == 2  # the read is not a message
    assert delta("chatkit_messages_total", outcome="completed") == 1
    assert delta("chatkit_messages_total", outcome="cancelled") == 1
    assert delta("chatkit_requests_total", type="threads.create") == 4
    assert delta("chatkit_requests_total", type="threads.list") == 3
    assert delta("chatkit_streams_open") == 0


def test_not_found_and_invalid_messages(
    make_server_app: Callable[..., Flask], store_url: str
) -> None:
    client = make_server_app(CHATKIT_MAX_INPUT_CHARS=10, CHATKIT_STORE_URL=store_url).test_client()
    delta = Delta()
    missing = add_message("thr_" + "0" * 32, "hi")
    assert post(client, missing).status_code == 404
    assert post(client, create("far too long for the cap")).status_code == 400
    assert post(client, {"type": "threads.create", "params": {}}).status_code == 400
    assert post(client, {"type": "no.such.type", "params": {}}).status_code == 400
    assert post(client, {"type": "attachments.create", "params": {}}).status_code == 400
    assert delta("chatkit_messages_total", outcome="not_found") == 1
    assert delta("chatkit_messages_total", outcome="invalid") == 2
    assert delta("chatkit_requests_total", type="unknown") == 1
    assert delta("chatkit_requests_total", type="attachments.create") == 1
    assert delta("chatkit_store_errors_total") == 0  # a missing thread is not a store failure
    assert value("chatkit_requests_total", type="no.such.type") == 0


def test_a_client_tool_output_nobody_waits_for_is_invalid(
    make_server_app: Callable[..., Flask],
) -> None:
    client = make_server_app().test_client()
    thread_id = events(post(client, create("hello")).data)[0]["thread"]["id"]
    delta = Delta()
    body = {"type": "threads.add_client_tool_output",
            "params": {"thread_id": thread_id, "result": {"ok": True}}}  # fmt: skip
    assert post(client, body).status_code == 409
    assert delta("chatkit_messages_total", outcome="invalid") == 1
    assert delta("chatkit_requests_total", type="threads.add_client_tool_output") == 1


def store_failure(store_url: str) -> Exception:
    """What the store at ``store_url`` raises when its database fails."""
    if store_url.startswith("sqlite:"):
        return sqlite3.OperationalError("database is locked")
    if store_url.startswith("redis"):
        import redis

        return redis.ConnectionError("Connection refused")
    import sqlalchemy

    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed"))


def test_store_exceptions_are_counted(
    make_server_app: Callable[..., Flask], store_url: str
) -> None:
    app = make_server_app(CHATKIT_STORE_URL=store_url)
    client = app.test_client()
    store = app.extensions["chatkit"].server.store  # the runtime's own store, under the counter

    async def locked(*args: Any, **kwargs: Any) -> Any:
        raise store_failure(store_url)

    store.load_threads = locked
    store.save_thread = locked
    delta = Delta()
    assert post(client, {"type": "threads.list", "params": {}}).status_code == 503
    assert post(client, create()).status_code == 503  # before the answer starts
    assert delta("chatkit_store_errors_total") == 2
    assert delta("chatkit_messages_total", outcome="unavailable") == 1
    assert delta("chatkit_requests_total", type="threads.list") == 1
    assert delta("chatkit_streams_open") == 0


def test_a_failing_metric_never_breaks_a_response(
    make_server_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatkit_flask.server import metrics as server_metrics

    client = make_server_app().test_client()

    def explode(*args: Any) -> None:
        raise RuntimeError("metrics backend exploded")

    monkeypatch.setattr(server_metrics.requests, "labels", explode)
    response = post(client, create("still answered"))
    assert response.status_code == 200
    assert events(response.data)[-1]["item"]["content"][0]["text"] == "You said: still answered"


ALLOWED_LABELS = {"le", "type", "outcome", "scope", "kind", "status"}


def test_labels_never_hold_an_id_or_a_text(make_server_app: Callable[..., Flask]) -> None:
    from chatkit_flask.server.metrics import (
        MESSAGE_OUTCOMES,
        REFUSAL_SCOPES,
        REQUEST_TYPES,
    )

    client = make_server_app(CHATKIT_RATELIMIT_PER_USER="1 per minute").test_client()
    created = post(client, create(SECRET_TEXT), headers={"X-Request-ID": "req-" + SECRET_TEXT})
    thread_id = events(created.data)[0]["thread"]["id"]
    cookie = client.get_cookie("chatkit_session_id").value
    post(client, add_message(thread_id, SECRET_TEXT))
    post(client, {"type": SECRET_TEXT, "params": {}})
    scrape = client.get("/metrics").text
    for secret in (SECRET_TEXT, thread_id, cookie, cookie.split(".")[0], "thr_", "msg_"):
        assert secret not in scrape
    closed = {
        "type": set(REQUEST_TYPES),
        "outcome": set(MESSAGE_OUTCOMES) | {"minted"} | {"rate_limited"},
        "scope": set(REFUSAL_SCOPES),
        "kind": {"input", "output"},
    }
    for family in text_string_to_metric_families(scrape):
        if not family.name.startswith(("chatkit_requests", "chatkit_messages", "chatkit_refused",
                                       "chatkit_model", "chatkit_streams", "chatkit_first_",
                                       "chatkit_stream_", "chatkit_store")):  # fmt: skip
            continue
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            for label, label_value in sample.labels.items():
                if label in closed:
                    assert label_value in closed[label], sample


def test_message_log_line(make_server_app: Callable[..., Flask], mint_logs: Any) -> None:
    client = make_server_app().test_client()
    created = post(client, create(SECRET_TEXT))
    thread_id = events(created.data)[0]["thread"]["id"]
    (record,) = [r for r in mint_logs.records if r.name == "chatkit_flask.message"]
    fields = record.chatkit
    assert fields["type"] == "threads.create"
    assert fields["outcome"] == "completed"
    assert fields["status"] == 200
    assert re.fullmatch(r"v:[0-9a-f]{16}", fields["visitor"])
    # The first frame (thread.created) leaves before the model is called.
    assert 0 < fields["ttfe_ms"] <= fields["first_answer_ms"] <= fields["duration_ms"]
    # Where the time went: identity and limits, first frame, history read and budget reserved
    # (model called), the model's first delta in, the answer's first frame.
    assert 0 < fields["admitted_ms"] <= fields["ttfe_ms"] <= fields["model_called_ms"]
    assert fields["model_called_ms"] <= fields["first_answer_ms"] <= fields["model_delta_ms"]
    assert fields["model_delta_ms"] <= fields["duration_ms"]
    assert "queued_ms" not in fields  # only under the ASGI worker (a thread's wait)
    assert fields["tokens_in"] > 0 and fields["tokens_out"] > 0
    mint_logs.clear()
    post(client, add_message(thread_id, SECRET_TEXT))
    (record,) = [r for r in mint_logs.records if r.name == "chatkit_flask.message"]
    line = record.getMessage()
    assert "thread=" in line and thread_id not in line
    assert SECRET_TEXT not in line and SECRET_TEXT not in json.dumps(record.chatkit)
    assert re.search(
        r" admitted_ms=[0-9.]+ ttfe_ms=[0-9.]+ model_called_ms=[0-9.]+ model_delta_ms=[0-9.]+"
        r" first_answer_ms=[0-9.]+ duration_ms=[0-9.]+$",
        line,
    )

    from chatkit_flask.logs import JsonFormatter

    entry = json.loads(JsonFormatter().format(record))
    assert entry["event"] == "message"
    assert entry["outcome"] == "completed" and "ttfe_ms" in entry


# ---------------------------------------------------------------------- gunicorn


def _scrape(base: str) -> dict[str, float]:
    text = requests.get(base + "/metrics", headers={"Connection": "close"}, timeout=10).text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def _open_stream(port: int, body: dict[str, Any]) -> socket.socket:
    """A message on its own connection, read until the answer has begun."""
    payload = json.dumps(body)
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(
        (
            f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(payload)}\r\n\r\n{payload}"
        ).encode()
    )
    received = b""
    while b"thread.item.updated" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return sock


def _read_to_end(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):  # "Connection: close": the server closes after the body
        received += chunk
    sock.close()
    return received


def _open_per_worker(multiproc: Path, tmp_path: Path) -> list[float]:
    """``chatkit_streams_open`` of each worker, read from that worker's file alone."""
    values = []
    for path in multiproc.glob("gauge_livesum_*.db"):
        alone = tmp_path / f"alone-{path.stem}"
        alone.mkdir()
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        values.append(
            sum(
                sample.value
                for family in registry.collect()
                if family.name == "chatkit_streams_open"
                for sample in family.samples
            )
        )
    return values


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gauge_and_counters_across_gunicorn_workers(
    real_redis: Any, fake: FakeResponses, tmp_path: Path
) -> None:
    from tests.test_server_gunicorn import Service

    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    fake.clear()
    svc = Service(tmp_path, fake, f"sqlite:///{tmp_path}/threads.db",
                  PROMETHEUS_MULTIPROC_DIR=str(multiproc), CHATKIT_LOG_LEVEL="error")  # fmt: skip
    try:
        deadline = time.monotonic() + 20  # every worker has imported the app
        while len(list(multiproc.glob("gauge_livesum_*.db"))) < 3:
            assert time.monotonic() < deadline, list(multiproc.iterdir())
            svc.post({"type": "threads.list", "params": {}})
        fake.token_delay = 0.15
        words = " ".join(f"w{n}" for n in range(30))  # about 5 s of answer
        # Six visitors at once: the workers share a burst of connections (one-off ones that
        # come one after another may all reach the worker the kernel wakes first).
        with ThreadPoolExecutor(6) as pool:
            socks = list(pool.map(lambda _: _open_stream(svc.port, create(words)), range(6)))
        per_worker = _open_per_worker(multiproc, tmp_path)
        assert sum(per_worker) == 6
        assert len([n for n in per_worker if n]) >= 2, f"one worker took all: {per_worker}"
        scrapes = [_scrape(svc.base) for _ in range(4)]
        for samples in scrapes:  # whichever worker answers, it sums the live workers
            assert samples["chatkit_streams_open{}"] == 6, samples["chatkit_streams_open{}"]
        # Closing one visitor's connection cancels its answer.
        socks.pop().close()
        answers = [_read_to_end(sock) for sock in socks]
        assert all(b"You said: w0" in answer for answer in answers)
        fake.token_delay = 0.0
        deadline = time.monotonic() + 10
        while _scrape(svc.base)["chatkit_streams_open{}"] != 0:
            assert time.monotonic() < deadline, "the gauge did not return to 0"
            time.sleep(0.2)
        samples = _scrape(svc.base)
        assert samples["chatkit_messages_total{outcome=completed}"] == 5
        assert samples["chatkit_messages_total{outcome=cancelled}"] == 1
        assert samples["chatkit_requests_total{type=threads.create}"] == 6
        assert samples["chatkit_stream_duration_seconds_count{}"] == 6
        assert samples["chatkit_first_event_seconds_count{}"] == 6
        assert samples["chatkit_first_answer_seconds_count{}"] == 6
        assert samples["chatkit_model_tokens_total{kind=output}"] > 5 * 30
        assert samples["chatkit_model_errors_total{}"] == 0
    finally:
        fake.token_delay = 0.0
        svc.stop()
    assert not svc.tracebacks(), svc.log_path.read_text()[-3000:]


def test_documented_alert_rules_parse_and_use_exported_metrics(
    make_server_app: Callable[..., Flask],
) -> None:
    import yaml

    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    rules = [rule for doc in blocks for group in doc["groups"] for rule in group["rules"]]
    server_metrics = re.compile(r"chatkit_(model|messages|streams|first|store)_")
    assert len([rule for rule in rules if server_metrics.search(rule["expr"])]) >= 5
    scrape = make_server_app().test_client().get("/metrics").text
    exported = {s.name for f in text_string_to_metric_families(scrape) for s in f.samples}
    for rule in rules:
        assert {"alert", "expr"} <= set(rule)
        used = set(re.findall(r"\bchatkit_[a-z_]+", rule["expr"]))
        assert used <= exported, (rule["alert"], used - exported)
