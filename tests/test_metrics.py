"""Prometheus metrics: values after known traffic in-process, the /metrics endpoint's access
rules, and totals summed across several gunicorn workers (multiprocess mode)."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from flask import Flask
from flask_limiter import Limiter
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from chatkit_flask import ChatKit
from chatkit_flask.metrics import init_metrics, set_circuit_state
from chatkit_flask.settings import ConfigError
from chatkit_flask.testing.fake_chatkit import Behaviour, FakeChatKit
from tests.conftest import REDIS_URL, TEST_API_KEY, TEST_SECRET_KEY, WORKFLOW, base_config

ROOT = Path(__file__).resolve().parent.parent
URL = "/api/chatkit/secret"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Snapshot:
    """Metric values now, to assert on what known traffic added (the registry is global)."""

    NAMES: tuple[tuple[str, dict[str, str]], ...] = (
        ("chatkit_mints_total", {"outcome": "minted"}),
        ("chatkit_mints_total", {"outcome": "rate_limited"}),
        ("chatkit_mints_total", {"outcome": "upstream_error"}),
        ("chatkit_mints_total", {"outcome": "upstream_timeout"}),
        ("chatkit_mints_total", {"outcome": "limiter_unavailable"}),
        ("chatkit_rate_limited_total", {"scope": "user"}),
        ("chatkit_rate_limited_total", {"scope": "ip"}),
        ("chatkit_upstream_responses_total", {"status": "200"}),
        ("chatkit_upstream_responses_total", {"status": "500"}),
        ("chatkit_upstream_responses_total", {"status": "timeout"}),
        ("chatkit_upstream_responses_total", {"status": "error"}),
        ("chatkit_upstream_latency_seconds_count", {}),
        ("chatkit_upstream_latency_seconds_bucket", {"le": "0.05"}),
        ("chatkit_limiter_storage_errors_total", {}),
    )

    def __init__(self) -> None:
        self.before = {self._key(n, lb): value(n, **lb) for n, lb in self.NAMES}

    @staticmethod
    def _key(name: str, labels: dict[str, str]) -> str:
        return name + "".join(f",{k}={v}" for k, v in sorted(labels.items()))

    def delta(self, name: str, **labels: str) -> float:
        return value(name, **labels) - self.before[self._key(name, labels)]


def test_known_traffic_gives_known_values(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    app = make_app(
        CHATKIT_RATELIMIT_PER_USER="4 per minute",
        CHATKIT_UPSTREAM_TIMEOUT=0.5,
        CHATKIT_UPSTREAM_RETRIES=0,
    )
    client = app.test_client()
    snap = Snapshot()
    upstream.enqueue(
        Behaviour.ok(),
        Behaviour.ok(),
        Behaviour.error(500),
        Behaviour.slow(2),
    )
    statuses = [client.post(URL, json={}).status_code for _ in range(6)]
    assert statuses == [200, 200, 502, 504, 429, 429]
    # Not a mint: not counted (a new visitor: the limits count every method of the endpoint).
    assert app.test_client().get(URL).status_code == 405

    assert snap.delta("chatkit_mints_total", outcome="minted") == 2
    assert snap.delta("chatkit_mints_total", outcome="upstream_error") == 1
    assert snap.delta("chatkit_mints_total", outcome="upstream_timeout") == 1
    assert snap.delta("chatkit_mints_total", outcome="rate_limited") == 2
    assert snap.delta("chatkit_rate_limited_total", scope="user") == 2
    assert snap.delta("chatkit_rate_limited_total", scope="ip") == 0
    assert snap.delta("chatkit_upstream_responses_total", status="200") == 2
    assert snap.delta("chatkit_upstream_responses_total", status="500") == 1
    assert snap.delta("chatkit_upstream_responses_total", status="timeout") == 1
    # Four upstream calls were timed; the three quick ones fell in the first bucket.
    assert snap.delta("chatkit_upstream_latency_seconds_count") == 4
    assert snap.delta("chatkit_upstream_latency_seconds_bucket", le="0.05") == 3
    assert value("chatkit_upstream_latency_seconds_bucket", le="+Inf") == value(
        "chatkit_upstream_latency_seconds_count"
    )


def test_connection_failure_counts_as_error(make_app: Callable[..., Flask]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    app = make_app(CHATKIT_API_BASE=f"http://127.0.0.1:{closed}", CHATKIT_UPSTREAM_RETRIES=0)
    snap = Snapshot()
    assert app.test_client().post(URL, json={}).status_code == 502
    assert snap.delta("chatkit_upstream_responses_total", status="error") == 1
    assert snap.delta("chatkit_mints_total", outcome="upstream_error") == 1


def test_circuit_breaker_refusals_are_not_upstream_responses(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    app = make_app(
        CHATKIT_BREAKER_FAILURES=2, CHATKIT_BREAKER_COOLDOWN=60, CHATKIT_UPSTREAM_RETRIES=0
    )
    upstream.set_default(Behaviour.error(503))
    snap = Snapshot()
    try:
        statuses = [app.test_client().post(URL, json={}).status_code for _ in range(3)]
        assert statuses == [502, 502, 503]
        assert upstream.count == 2  # the third was refused by the open circuit
        assert snap.delta("chatkit_mints_total", outcome="upstream_error") == 2
        assert value("chatkit_mints_total", outcome="upstream_unavailable") >= 1
        assert value("chatkit_upstream_circuit_state") == 2
        assert snap.delta("chatkit_upstream_latency_seconds_count") == 2
        assert snap.delta("chatkit_upstream_responses_total", status="error") == 0
    finally:
        set_circuit_state("closed")


def test_ip_scope_is_counted(make_app: Callable[..., Flask]) -> None:
    app = make_app(CHATKIT_RATELIMIT_PER_IP="2 per minute")
    snap = Snapshot()
    statuses = []
    for _ in range(3):
        client = app.test_client()  # a new visitor each time: only the IP limit can bite
        statuses.append(client.post(URL, json={}).status_code)
    assert statuses == [200, 200, 429]
    assert snap.delta("chatkit_rate_limited_total", scope="ip") == 1
    assert snap.delta("chatkit_rate_limited_total", scope="user") == 0


def test_metrics_endpoint_serves_the_exposition_format(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    client.post(URL, json={})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    assert response.headers["Cache-Control"] == "no-store"
    families = {family.name for family in text_string_to_metric_families(response.text)}
    assert {
        "chatkit_mints",
        "chatkit_rate_limited",
        "chatkit_upstream_latency_seconds",
        "chatkit_upstream_responses",
        "chatkit_limiter_storage_errors",
        "chatkit_limiter_fallback_active",
        "chatkit_upstream_circuit_state",
    } <= families


@pytest.mark.parametrize(
    ("remote", "status"),
    [
        ("127.0.0.1", 200),
        ("::1", 200),
        ("10.1.2.3", 200),
        ("172.20.0.5", 200),
        ("192.168.1.9", 200),
        ("::ffff:10.0.0.7", 200),
        ("8.8.8.8", 403),
        ("172.32.0.1", 403),
        ("2001:db8::1", 403),
    ],
)
def test_metrics_allowlist(make_app: Callable[..., Flask], remote: str, status: int) -> None:
    client = make_app().test_client()
    response = client.get("/metrics", environ_base={"REMOTE_ADDR": remote})
    assert response.status_code == status
    if status == 403:
        assert response.get_json()["error"] == "forbidden"
        assert b"chatkit_mints" not in response.data


def test_metrics_allowlist_is_configurable(make_app: Callable[..., Flask]) -> None:
    client = make_app(CHATKIT_METRICS_ALLOW="192.0.2.0/24, 2001:db8::/32").test_client()
    assert client.get("/metrics").status_code == 403  # 127.0.0.1 no longer listed
    ok = client.get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.44"})
    assert ok.status_code == 200
    ok6 = client.get("/metrics", environ_base={"REMOTE_ADDR": "2001:db8::5"})
    assert ok6.status_code == 200


def test_bad_allowlist_stops_start_up(make_app: Callable[..., Flask]) -> None:
    with pytest.raises(ConfigError) as info:
        make_app(CHATKIT_METRICS_ALLOW="10.0.0.0/8,not-a-network")
    assert info.value.key == "CHATKIT_METRICS_ALLOW"


def test_service_can_turn_metrics_off(make_app: Callable[..., Flask]) -> None:
    assert make_app(CHATKIT_METRICS_ENABLED="false").test_client().get("/metrics").status_code == (
        404
    )
    # An empty value (KEY= in .env) means the service default: on.
    assert make_app(CHATKIT_METRICS_ENABLED="").test_client().get("/metrics").status_code == 200


def _host_app(upstream: FakeChatKit, **config: Any) -> Flask:
    app = Flask("host")
    app.config.update(base_config(upstream, **config))
    return app


def test_host_apps_get_no_endpoint_unless_they_ask(upstream: FakeChatKit) -> None:
    app = _host_app(upstream)
    ChatKit(app)
    assert app.test_client().get("/metrics").status_code == 404

    flagged = _host_app(upstream, CHATKIT_METRICS_ENABLED=True)
    ChatKit(flagged)
    assert flagged.test_client().get("/metrics").status_code == 200

    explicit = _host_app(upstream)
    ChatKit(explicit)
    init_metrics(explicit, path="/internal/metrics", allow=["127.0.0.1/32"])
    init_metrics(explicit)  # a second call changes nothing
    client = explicit.test_client()
    snap = Snapshot()
    assert client.post(URL, json={}).status_code == 200
    assert snap.delta("chatkit_mints_total", outcome="minted") == 1  # counted once
    assert client.get("/internal/metrics").status_code == 200
    assert client.get("/metrics").status_code == 404


def test_init_metrics_needs_the_extension() -> None:
    with pytest.raises(RuntimeError):
        init_metrics(Flask("bare"))


def test_metrics_endpoint_is_not_rate_limited(upstream: FakeChatKit) -> None:
    app = _host_app(upstream)
    limiter = Limiter(
        lambda: "everyone", app=app, default_limits=["1 per minute"], storage_uri="memory://"
    )
    ChatKit(app, limiter=limiter)
    init_metrics(app)
    client = app.test_client()
    assert [client.get("/metrics").status_code for _ in range(3)] == [200, 200, 200]


# ---------------------------------------------------------------------- limiter storage


def test_fallback_gauge_and_storage_errors(
    make_app: Callable[..., Flask], fakeredis_storage: dict[str, Any]
) -> None:
    app = make_app(**fakeredis_storage)
    client = app.test_client()
    assert client.post(URL, json={}).status_code == 200
    assert value("chatkit_limiter_fallback_active") == 0
    snap = Snapshot()
    fakeredis_storage["_fake_server"].connected = False
    assert client.post(URL, json={}).status_code == 200  # limited from memory
    assert value("chatkit_limiter_fallback_active") == 1
    assert snap.delta("chatkit_limiter_storage_errors_total") == 1
    assert client.post(URL, json={}).status_code == 200
    assert snap.delta("chatkit_limiter_storage_errors_total") == 1  # counted on the switch only
    scrape = client.get("/metrics").text
    assert "chatkit_limiter_fallback_active 1.0" in scrape


def test_fail_closed_503_counts_a_storage_error(
    make_app: Callable[..., Flask], fakeredis_storage: dict[str, Any]
) -> None:
    app = make_app(RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=False, **fakeredis_storage)
    fakeredis_storage["_fake_server"].connected = False
    snap = Snapshot()
    assert app.test_client().post(URL, json={}).status_code == 503
    assert snap.delta("chatkit_limiter_storage_errors_total") == 1
    assert snap.delta("chatkit_mints_total", outcome="limiter_unavailable") == 1


def test_fail_open_swallowed_errors_are_counted(
    make_app: Callable[..., Flask], fakeredis_storage: dict[str, Any]
) -> None:
    app = make_app(
        RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=False,
        RATELIMIT_SWALLOW_ERRORS=True,
        **fakeredis_storage,
    )
    fakeredis_storage["_fake_server"].connected = False
    snap = Snapshot()
    client = app.test_client()
    assert client.post(URL, json={}).status_code == 200
    assert client.post(URL, json={}).status_code == 200
    assert snap.delta("chatkit_limiter_storage_errors_total") == 2
    assert value("chatkit_limiter_fallback_active") == 0


@pytest.fixture
def fakeredis_storage() -> dict[str, Any]:
    from tests.conftest import fakeredis_config

    return fakeredis_config()


def test_set_circuit_state() -> None:
    try:
        set_circuit_state("open")
        assert value("chatkit_upstream_circuit_state") == 2
        set_circuit_state("half_open")
        assert value("chatkit_upstream_circuit_state") == 1
        with pytest.raises(ValueError):
            set_circuit_state("ajar")
    finally:
        set_circuit_state("closed")
    assert value("chatkit_upstream_circuit_state") == 0


# ---------------------------------------------------------------------- gunicorn


def test_gunicorn_child_exit_hook_marks_the_worker_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = ROOT / "config" / "gunicorn.conf.py"
    if not conf.exists():
        pytest.skip("config/gunicorn.conf.py is not in this checkout")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    live = tmp_path / "gauge_livemax_4242.db"
    counter = tmp_path / "counter_4242.db"
    live.write_bytes(b"")
    counter.write_bytes(b"")
    hooks = runpy.run_path(str(conf))
    hooks["child_exit"](None, SimpleNamespace(pid=4242))
    assert not live.exists()
    assert counter.exists()  # counters of dead workers keep counting in the totals


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gunicorn_metrics(
    real_redis: Any, upstream: FakeChatKit, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "RATELIMIT_"))}
    env.update(
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
        OPENAI_API_KEY=TEST_API_KEY,
        SECRET_KEY=TEST_SECRET_KEY,
        CHATKIT_WORKFLOW_ID=WORKFLOW,
        CHATKIT_API_BASE=upstream.base_url,
        RATELIMIT_STORAGE_URI=REDIS_URL,
        CHATKIT_COOKIE_SECURE="false",
        CHATKIT_RATELIMIT_PER_USER="5 per minute",
        CHATKIT_RATELIMIT_PER_IP="22 per minute",
        CHATKIT_LOG_LEVEL="error",
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gunicorn", "-w", "3", "--threads", "4"]
    command += ["-b", f"127.0.0.1:{port}", "wsgi:app"]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the workers die with it
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                pytest.fail(f"gunicorn exited: {stderr[-2000:]}")
            # Every worker writes its counter file when it imports the app: wait for all 3.
            booted = len(list(multiproc.glob("counter_*.db"))) >= 3
            try:
                if booted and requests.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gunicorn did not start in 30 s")
            time.sleep(0.1)
        yield base, multiproc
    finally:
        with_group = True
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            with_group = False
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            if with_group:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stderr:
            process.stderr.close()


def _scrape(base: str) -> dict[str, float]:
    """Samples of one scrape, keyed by ``name{label=value,...}``; on a new connection."""
    text = requests.get(base + "/metrics", headers={"Connection": "close"}, timeout=10).text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def _requests_per_worker(multiproc: Path, tmp_path: Path) -> dict[str, float]:
    """Mint requests each worker counted, read from that worker's file alone."""
    counts = {}
    for path in multiproc.glob("counter_*.db"):
        alone = tmp_path / f"alone-{path.stem}"
        alone.mkdir()
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        counts[path.stem] = sum(
            sample.value
            for family in registry.collect()
            if family.name == "chatkit_mints"
            for sample in family.samples
            if sample.name == "chatkit_mints_total"
        )
    return counts


@pytest.mark.slow
def test_totals_add_up_across_gunicorn_workers(
    gunicorn_metrics: tuple[str, Path], upstream: FakeChatKit, tmp_path: Path
) -> None:
    base, multiproc = gunicorn_metrics
    upstream.latency = 0.01  # keep requests in flight together, on several workers

    def visitor(n: int) -> list[int]:
        statuses = []
        with requests.Session() as session:  # one cookie: one visitor
            for _ in range(8):
                response = session.post(
                    base + URL, json={}, headers={"Connection": "close"}, timeout=10
                )
                statuses.append(response.status_code)
        return statuses

    # One greedy visitor first: 5 admitted, then 3 refused by the per-user limit.
    statuses = Counter(visitor(0))
    assert statuses == {200: 5, 429: 3}
    with ThreadPoolExecutor(5) as pool:
        statuses += Counter(s for batch in pool.map(visitor, range(1, 6)) for s in batch)
    assert statuses[200] + statuses[429] == 48, statuses
    assert statuses[200] == 22  # the IP limit; each visitor could have had 5
    assert statuses[429] == 26

    # Whichever worker answers the scrape, it reports the sum over all workers.
    scrapes = [_scrape(base) for _ in range(6)]
    per_worker = _requests_per_worker(multiproc, tmp_path)
    assert sum(per_worker.values()) == 48
    assert len([n for n in per_worker.values() if n]) >= 2, f"one worker took all: {per_worker}"
    for samples in scrapes:
        assert samples["chatkit_mints_total{outcome=minted}"] == statuses[200]
        assert samples["chatkit_mints_total{outcome=rate_limited}"] == statuses[429]
        limited = sum(
            samples[f"chatkit_rate_limited_total{{scope={scope}}}"]
            for scope in ("user", "ip", "global")
        )
        assert limited == statuses[429]
        assert samples["chatkit_rate_limited_total{scope=ip}"] > 0
        assert samples["chatkit_rate_limited_total{scope=user}"] > 0
        assert samples["chatkit_upstream_responses_total{status=200}"] == statuses[200]
        assert samples["chatkit_upstream_latency_seconds_count{}"] == statuses[200]
        assert samples["chatkit_limiter_fallback_active{}"] == 0
    assert upstream.count == statuses[200]


def test_grafana_dashboard_uses_only_exported_metrics(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    client = make_app().test_client()
    assert client.post(URL, json={}).status_code == 200  # label values appear with the first call
    exported = client.get("/metrics").text
    # The server-mode row: what a server-mode app exports before any traffic.
    server = make_app(CHATKIT_BACKEND="server", CHATKIT_STORE_URL=f"sqlite:///{tmp_path}/t.db")
    exported += server.test_client().get("/metrics").text
    names = {
        sample.name
        for family in text_string_to_metric_families(exported)
        for sample in family.samples
    }
    exprs = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\bchatkit_[a-z_]+", expr)}
    assert used
    assert used <= names, used - names
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
