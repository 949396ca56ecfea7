"""Soak: thousands of mints at high concurrency through gunicorn, real Redis, the fake upstream.

Visitors (pre-signed cookies) sit behind client IPs (sent as X-Forwarded-For through one trusted
proxy). "Light" IPs hold few visitors, so the per-visitor limit binds; "heavy" IPs hold many
visitors plus cookie-less requests (cookie rotation), so the per-IP limit binds. All requests are
shuffled and fired at once. Checked afterwards:

* every visitor and every IP admitted exactly what the limits allow:
  admitted(ip) == min(PER_IP, sum over its visitors of min(requests, PER_USER)) and, on light
  IPs, admitted(visitor) == min(requests, PER_USER) (Flask-Limiter stops at the first breached
  limit, per-user before per-IP, so an IP's counter only counts requests its visitors could pass);
* the upstream saw exactly the admitted requests; zero 5xx, zero connection errors, no traceback;
* each worker's RSS (from /proc) at the start and the end of the run stays flat.

Prints a summary and exits 1 on any violation::

    .venv/bin/python bench/soak.py                      # ~6,000 mints, 64 concurrent clients
    .venv/bin/python bench/soak.py --repeat 3           # three rounds on the same workers

Starts its own ``redis-server`` on a free port and stops it at the end; ``--redis-url URL`` uses a
Redis you run instead (that database is flushed at the start and the end).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatkit_flask.identity import VisitorCookie  # noqa: E402
from chatkit_flask.testing.fake_chatkit import FakeChatKit  # noqa: E402
from chatkit_flask.testing.redis_server import RedisServer  # noqa: E402

API_KEY = "soak-openai-key-not-real"
SECRET_KEY = "soak-secret-key-for-visitor-cookies"
WORKFLOW = "wf_soak"
COOKIE = "chatkit_session_id"
URL = "/api/chatkit/secret"


@dataclass(frozen=True)
class Request:
    ip: str
    visitor: str | None  # None: a cookie-less request (a fresh visitor each time)
    cookie: str | None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_pids(master: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True
    )
    return sorted(int(line) for line in out.stdout.split())


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def build_plan(args: argparse.Namespace, round_no: int) -> tuple[list[Request], dict, dict]:
    """The requests of one round and, per IP and per visitor, what must be admitted."""
    signer = VisitorCookie(SECRET_KEY, [], 86400)
    requests_: list[Request] = []
    expect_ip: dict[str, int] = {}
    expect_visitor: dict[str, int] = {}
    for kind, count, visitors, cookieless in (
        ("light", args.light_ips, args.light_visitors, 0),
        ("heavy", args.heavy_ips, args.heavy_visitors, args.cookieless),
    ):
        for n in range(count):
            ip = f"10.{round_no}.{1 if kind == 'light' else 2}.{n + 1}"
            capacity = cookieless  # each cookie-less request is a new visitor: passes its check
            for _ in range(visitors):
                visitor, cookie = signer.issue()
                capacity += min(args.requests, args.per_user)
                requests_ += [Request(ip, visitor, cookie)] * args.requests
                if kind == "light":
                    expect_visitor[visitor] = min(args.requests, args.per_user)
            requests_ += [Request(ip, None, None)] * cookieless
            expect_ip[ip] = min(args.per_ip, capacity)
    random.shuffle(requests_)
    return requests_, expect_ip, expect_visitor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--redis-url", help="a Redis database you run (flushed) instead of a private redis-server"
    )
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--per-user", type=int, default=5)
    parser.add_argument("--per-ip", type=int, default=40)
    parser.add_argument("--light-ips", type=int, default=40)
    parser.add_argument("--light-visitors", type=int, default=4)
    parser.add_argument("--heavy-ips", type=int, default=20)
    parser.add_argument("--heavy-visitors", type=int, default=15)
    parser.add_argument("--cookieless", type=int, default=20)
    parser.add_argument("--requests", type=int, default=12, help="per visitor")
    parser.add_argument("--latency", type=float, default=0.005, help="fake upstream, seconds")
    parser.add_argument("--repeat", type=int, default=1, help="rounds on the same workers")
    parser.add_argument("--rss-slack-kib", type=int, default=8192)
    args = parser.parse_args()

    own_redis = RedisServer() if args.redis_url is None else None
    if own_redis is not None:
        own_redis.start()
        args.redis_url = own_redis.url(13)
    store = redis.Redis.from_url(args.redis_url)
    store.flushdb()
    upstream = FakeChatKit(latency=args.latency, api_key=API_KEY).start()
    port = free_port()
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for the operator to read
        "w+b", prefix="soak-gunicorn-", suffix=".log", delete=False
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "RATELIMIT_"))}
    env.update(
        OPENAI_API_KEY=API_KEY,
        SECRET_KEY=SECRET_KEY,
        CHATKIT_WORKFLOW_ID=WORKFLOW,
        CHATKIT_API_BASE=upstream.base_url,
        CHATKIT_COOKIE_SECURE="false",
        CHATKIT_TRUSTED_PROXIES="1",
        CHATKIT_RATELIMIT_PER_USER=f"{args.per_user} per hour",
        CHATKIT_RATELIMIT_PER_IP=f"{args.per_ip} per hour",
        CHATKIT_LOG_LEVEL="error",
        CHATKIT_METRICS_ENABLED="false",
        RATELIMIT_STORAGE_URI=args.redis_url,
        GUNICORN_BIND=f"127.0.0.1:{port}",
        GUNICORN_WORKERS=str(args.workers),
        GUNICORN_THREADS=str(args.threads),
        GUNICORN_ACCESS_LOG="off",
        GUNICORN_LOG_LEVEL="warning",
    )
    conf = ROOT / "config" / "gunicorn.conf.py"
    command = [sys.executable, "-m", "gunicorn"]
    command += ["-c", str(conf)] if conf.exists() else ["-k", "gthread", "-b", f"127.0.0.1:{port}"]
    master = subprocess.Popen([*command, "wsgi:app"], cwd=ROOT, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    violations: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or master.poll() is not None:
                raise SystemExit("gunicorn did not start; see " + log.name)
            time.sleep(0.2)
        local = threading.local()

        def fire(req: Request) -> tuple[Request, int, float]:
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
                session.trust_env = False
            headers = {"X-Forwarded-For": req.ip}
            if req.cookie:
                headers["Cookie"] = f"{COOKIE}={req.cookie}"
            started = time.monotonic()
            try:
                status = session.post(base + URL, json={}, headers=headers, timeout=30).status_code
            except requests.RequestException:
                status = -1
            session.cookies.clear()
            return req, status, time.monotonic() - started

        # Warm-up on its own IPs (not checked) so the workers' RSS baseline is post-import.
        warm = [Request(f"10.250.0.{i % 200 + 1}", None, None) for i in range(400)]
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(fire, warm))
        warm_admitted = upstream.count
        pids = worker_pids(master.pid)
        rss_start = {pid: rss_kib(pid) for pid in pids}

        totals: Counter[int] = Counter()
        all_durations: list[float] = []
        elapsed_total = 0.0
        ip_mismatch = visitor_mismatch = 0
        checked_ips = checked_visitors = 0
        for round_no in range(1, args.repeat + 1):
            plan, expect_ip, expect_visitor = build_plan(args, round_no)
            started = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(fire, plan))
            elapsed_total += time.monotonic() - started
            by_ip: Counter[str] = Counter()
            by_visitor: Counter[str] = Counter()
            per_visitor_max: dict[str, int] = defaultdict(int)
            for req, status, duration in results:
                totals[status] += 1
                all_durations.append(duration)
                if status == 200:
                    by_ip[req.ip] += 1
                    if req.visitor:
                        by_visitor[req.visitor] += 1
                        per_visitor_max[req.visitor] = by_visitor[req.visitor]
            for ip, expected in expect_ip.items():
                checked_ips += 1
                if by_ip[ip] != expected:
                    ip_mismatch += 1
                    violations.append(f"round {round_no} ip {ip}: {by_ip[ip]} != {expected}")
            for visitor, expected in expect_visitor.items():
                checked_visitors += 1
                if by_visitor[visitor] != expected:
                    visitor_mismatch += 1
                    violations.append(
                        f"visitor {visitor[:6]}..: {by_visitor[visitor]} != {expected}"
                    )
            for visitor, admitted in by_visitor.items():
                if admitted > args.per_user:
                    violations.append(f"visitor {visitor[:6]}.. over the limit: {admitted}")
        time.sleep(0.5)
        rss_end = {pid: rss_kib(pid) for pid in pids if Path(f"/proc/{pid}").exists()}
        admitted = totals[200]
        if upstream.count - warm_admitted != admitted:
            violations.append(
                f"upstream saw {upstream.count - warm_admitted} != admitted {admitted}"
            )
        errors = {s: n for s, n in totals.items() if s not in (200, 429)}
        if errors:
            violations.append(f"statuses other than 200/429: {errors}")
        if set(rss_end) != set(rss_start):
            violations.append(
                f"workers changed during the run: {sorted(rss_start)} -> {sorted(rss_end)}"
            )
        drift = {pid: rss_end.get(pid, 0) - rss_start[pid] for pid in rss_start}
        for pid, kib in drift.items():
            if kib > args.rss_slack_kib:
                violations.append(f"worker {pid} RSS grew {kib} KiB")
        log.seek(0)
        log_text = log.read().decode("utf-8", "replace")
        if "Traceback" in log_text:
            violations.append("a traceback in the service log: " + log.name)
    finally:
        master.terminate()
        try:
            master.wait(timeout=20)
        except subprocess.TimeoutExpired:
            master.kill()
        upstream.stop()
        store.flushdb()
        store.close()
        if own_redis is not None:
            own_redis.stop()

    total = sum(totals.values())
    durations = sorted(all_durations)

    def pct(p: float) -> float:
        return durations[min(len(durations) - 1, int(p * len(durations)))] * 1000

    print(
        f"soak: {total} mints in {elapsed_total:.1f} s ({total / elapsed_total:.0f}/s), "
        f"{args.repeat} round(s), concurrency {args.concurrency}, "
        f"gunicorn {args.workers}x{args.threads} gthread, Redis {args.redis_url}"
    )
    print(
        f"statuses: {dict(sorted(totals.items()))}  "
        f"(5xx: {sum(n for s, n in totals.items() if s >= 500)}, "
        f"connection errors: {totals[-1]})"
    )
    print(
        f"latency ms: p50 {pct(0.5):.1f}  p95 {pct(0.95):.1f}  p99 {pct(0.99):.1f}  "
        f"max {durations[-1] * 1000:.1f}"
    )
    print(
        f"limit exactness: {checked_ips - ip_mismatch}/{checked_ips} IPs exact, "
        f"{checked_visitors - visitor_mismatch}/{checked_visitors} visitors exact "
        f"(per user {args.per_user}/h, per IP {args.per_ip}/h); upstream calls == admitted: "
        f"{upstream.count - warm_admitted == admitted}"
    )
    print(
        "worker RSS KiB (start -> end, drift): "
        + ", ".join(
            f"{pid}: {rss_start[pid]} -> {rss_end.get(pid, 0)} ({drift[pid]:+d})"
            for pid in rss_start
        )
    )
    if violations:
        print(f"FAIL: {len(violations)} violation(s)")
        for line in violations[:30]:
            print("  " + line)
        return 1
    print("OK: no violations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
