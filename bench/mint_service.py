"""The mint bench's targets: the service started as deployed (gunicorn with the shipped config,
limits in Redis) for one variant, and the fake upstream driven directly (the ceiling)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mint_load import drive
from procs import children, free_port, machine_jiffies, proc_cpu, proc_status, stop, wait_http
from redis_tools import Monitor, redis_cmd, redis_pid

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
API_KEY = "sk-bench"
WORKFLOW = "wf_bench"
COOKIE_NAME = "chatkit_session_id"
SECRET_PATH = "/api/chatkit/secret"
SERVICE_BODY = b"{}"
UPSTREAM_BODY = json.dumps(
    {
        "workflow": {"id": WORKFLOW},
        "user": "visitor_bench",
        "expires_after": {"anchor": "created_at", "seconds": 600},
    },
    separators=(",", ":"),
).encode()
UPSTREAM_HEADERS = {
    "Authorization": f"Bearer {API_KEY}",
    "OpenAI-Beta": "chatkit_beta=v1",
    "Content-Type": "application/json",
}
HIGH = "1000000 per minute;1000000 per day"
# limited: the visitor's own limit is spent by the request that obtained the cookie, so every
# measured request is rejected by the first limit evaluated (ties in window length keep the
# per-user limit first).
LIMITED_USER = "1 per 10 minutes;1000000 per day"
MONITOR_REQUESTS = 100


def service_env(args: argparse.Namespace, variant: str, upstream_port: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GUNICORN_", "CHATKIT_"))}
    env.pop("RATELIMIT_STORAGE_URI", None)
    env.update(
        {
            "OPENAI_API_KEY": API_KEY,
            "SECRET_KEY": "bench-secret-key-0123456789abcdef",
            "CHATKIT_WORKFLOW_ID": WORKFLOW,
            "CHATKIT_API_BASE": f"http://127.0.0.1:{upstream_port}",
            "CHATKIT_COOKIE_SECURE": "false",
            "RATELIMIT_STORAGE_URI": f"redis://127.0.0.1:{args.redis_port}/{args.redis_db}",
            "CHATKIT_RATELIMIT_PER_USER": LIMITED_USER if variant == "limited" else HIGH,
            "CHATKIT_RATELIMIT_PER_IP": HIGH,
            "CHATKIT_RATELIMIT_PER_IPV6_48": "off",
            "CHATKIT_RATELIMIT_GLOBAL": "off",  # on by default since 0.2.0
            "GUNICORN_BIND": f"127.0.0.1:{port}",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    for flag, name in (
        ("workers", "GUNICORN_WORKERS"),
        ("threads", "GUNICORN_THREADS"),
        ("worker_class", "GUNICORN_WORKER_CLASS"),
        ("access_log", "GUNICORN_ACCESS_LOG"),
    ):
        value = getattr(args, flag)
        if value is not None:
            env[name] = str(value)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def get_cookies(port: int, count: int) -> list[str]:
    """One fresh visitor cookie per connection: POST without a cookie, keep the Set-Cookie."""
    cookies = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(count):
        conn.request(
            "POST", SECRET_PATH, body=SERVICE_BODY, headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"getting a cookie answered {response.status}")
        value = response.getheader("Set-Cookie", "").split(";", 1)[0]
        if not value.startswith(COOKIE_NAME + "="):
            raise RuntimeError("the service set no visitor cookie")
        cookies.append(value)
        if response.getheader("Connection", "").lower() == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.close()
    return cookies


def drain(pids: list[int], timeout: float = 15.0) -> None:
    """Wait until the server is idle (requests queued when the load stopped are done)."""
    deadline = time.monotonic() + timeout
    last = sum(proc_cpu(p) for p in pids)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = sum(proc_cpu(p) for p in pids)
        if now - last < 0.02:
            return
        last = now


def count_round_trips(args: argparse.Namespace, port: int, cookie: str | None) -> dict[str, Any]:
    monitor = Monitor(args.redis_port, args.redis_db)
    time.sleep(0.2)
    statuses: Counter[int] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    for _ in range(MONITOR_REQUESTS):
        conn.request("POST", SECRET_PATH, body=SERVICE_BODY, headers=headers)
        response = conn.getresponse()
        response.read()
        statuses[response.status] += 1
        if response.getheader("Connection", "").lower() == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.close()
    commands = monitor.close()
    total = sum(commands.values())
    return {
        "requests": MONITOR_REQUESTS,
        "statuses": dict(statuses),
        "per_request": round(total / MONITOR_REQUESTS, 2),
        "commands_per_request": {
            k: round(v / MONITOR_REQUESTS, 2) for k, v in commands.most_common()
        },
    }


def run_variant(
    args: argparse.Namespace, variant: str, upstream: subprocess.Popen, upstream_port: int,
    workdir: Path, root: Path = ROOT, tree: str = "",
) -> dict[str, Any]:  # fmt: skip
    redis_cmd(args.redis_port, "flushdb", db=args.redis_db)
    port = free_port()
    env = service_env(args, variant, upstream_port, port)
    log_path = workdir / f"gunicorn-{tree or 'head'}-{variant}.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", "config/gunicorn.conf.py", "wsgi:app"],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(port, "/healthz", 30, server)
        cookies = [] if variant == "new" else get_cookies(port, args.connections)
        headers = {"Content-Type": "application/json"}
        # Warm-up: every worker thread opens its upstream and Redis connections.
        drive(args, port, SECRET_PATH, SERVICE_BODY, headers, cookies, args.warmup, workdir)
        pids = [server.pid, *children(server.pid)]
        redis = redis_pid(args.redis_port)
        cpu0 = sum(proc_cpu(p) for p in pids)
        up0 = proc_cpu(upstream.pid)
        rcpu0 = proc_cpu(redis) if redis else 0.0
        mach0 = machine_jiffies()
        load = drive(
            args, port, SECRET_PATH, SERVICE_BODY, headers, cookies, args.duration, workdir
        )
        mach1 = machine_jiffies()
        cpu1 = sum(proc_cpu(p) for p in pids)
        workers_after = children(server.pid)
        drain(pids)
        rss = {p: proc_status(p, "VmHWM") for p in workers_after}
        server_cores = (cpu1 - cpu0) / load["seconds"]
        upstream_cores = (proc_cpu(upstream.pid) - up0) / load["seconds"]
        redis_cores = ((proc_cpu(redis) if redis else 0.0) - rcpu0) / load["seconds"]
        busy_cores = (os.cpu_count() or 1) * (mach1[0] - mach0[0]) / max(1, mach1[1] - mach0[1])
        result = dict(load)
        expected = 429 if variant == "limited" else 200
        answered = load["statuses"].get(expected, 0)
        result.update(
            {
                "variant": variant,
                "tree": tree,
                "expected_status": expected,
                "rps": load["responses"] / load["seconds"],
                "server_cpu_ms_per_request": 1000 * (cpu1 - cpu0) / max(1, load["responses"]),
                "server_cpu_cores": server_cores,
                "upstream_cpu_cores": upstream_cores,
                "redis_cpu_ms_per_request": 1000
                * redis_cores
                * load["seconds"]
                / max(1, load["responses"]),
                "client_cpu_cores": load["client_cpu_s"] / load["seconds"],
                "machine_busy_pct": 100 * busy_cores / (os.cpu_count() or 1),
                # CPU used by anything else on the machine (other jobs skew the figures)
                "other_cpu_cores": max(
                    0.0,
                    busy_cores
                    - server_cores
                    - upstream_cores
                    - redis_cores
                    - load["client_cpu_s"] / load["seconds"],
                ),
                "answered_as_expected": answered,
                "errors": {
                    **{str(k): v for k, v in load["statuses"].items() if k != expected},
                    **load["socket_errors"],
                },
                "workers": len(workers_after),
                "workers_restarted": sorted(set(pids[1:]) ^ set(workers_after)) != [],
                "peak_rss_mb_per_worker": max(rss.values(), default=0) / 1024,
                "master_peak_rss_mb": proc_status(server.pid, "VmHWM") / 1024,
                "redis_round_trips": count_round_trips(args, port, cookies[0] if cookies else None),
            }
        )
        return result
    finally:
        stop(server)
        if args.keep_logs:
            print(f"service log: {log_path}", file=sys.stderr)


def run_ceiling(
    args: argparse.Namespace, upstream: subprocess.Popen, upstream_port: int, workdir: Path
) -> dict[str, Any]:
    path = "/v1/chatkit/sessions"
    drive(args, upstream_port, path, UPSTREAM_BODY, UPSTREAM_HEADERS, [], args.warmup, workdir)
    up0 = proc_cpu(upstream.pid)
    load = drive(args, upstream_port, path, UPSTREAM_BODY, UPSTREAM_HEADERS, [], args.duration,
                 workdir)  # fmt: skip
    result = dict(load)
    result.update(
        {
            "variant": "ceiling",
            "expected_status": 200,
            "rps": load["responses"] / load["seconds"],
            "upstream_cpu_cores": (proc_cpu(upstream.pid) - up0) / load["seconds"],
            "client_cpu_cores": load["client_cpu_s"] / load["seconds"],
            "errors": {
                **{str(k): v for k, v in load["statuses"].items() if k != 200},
                **load["socket_errors"],
            },
        }
    )
    return result


def gunicorn_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the config file resolves to under the bench's environment."""
    env = service_env(args, "returning", 0, 8000)
    code = (
        "import runpy,json;c=runpy.run_path('config/gunicorn.conf.py');"
        "print(json.dumps({k:c.get(k) for k in ('workers','threads','worker_class','accesslog')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def checkout(ref: str, workdir: Path) -> Path:
    """A detached worktree of ``ref`` under ``workdir`` (removed at the end of the run)."""
    path = workdir / "before"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT, check=True,
        capture_output=True,
    )  # fmt: skip
    return path
