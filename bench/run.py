"""Mint throughput and latency of the deployed service, side by side with the upstream's ceiling.

One command::

    .venv/bin/python bench/run.py [--duration 20] [--connections 64] [--latency 0.05]
                                  [--variant returning|new|limited|all]

What it does, all on loopback:

1. starts the fake ChatKit API (``python -m chatkit_flask.testing.fake_chatkit``) with
   ``--latency``;
2. starts its own ``redis-server`` on a free port (``--redis-port PORT`` uses a Redis you run
   instead), flushes the bench db (14) before each variant, and starts the service exactly as
   deployed: ``gunicorn -c config/gunicorn.conf.py wsgi:app`` with
   ``RATELIMIT_STORAGE_URI=redis://127.0.0.1:PORT/14`` and per-visitor and per-IP limits on (high
   enough never to reject, except in the ``limited`` variant, where every request is over the
   visitor's limit);
3. drives ``--connections`` keep-alive connections for ``--duration`` seconds with ``wrk`` (a Lua
   script: per-thread cookies, status counts, latency percentiles; ``--client asyncio`` or a
   machine without wrk uses a raw-socket asyncio client instead);
4. drives the same load straight at the fake upstream (``POST /v1/chatkit/sessions``): the ceiling;
5. prints one table and writes the figures to ``bench/results/<timestamp>.json``.

Variants: ``returning`` (each connection holds its own visitor cookie, obtained first), ``new``
(no cookie: each request issues and signs one), ``limited`` (every request answered 429).

Server CPU is utime+stime of the gunicorn master and workers (``/proc/<pid>/stat``) over the
measured run, divided by the requests answered; peak RSS is each worker's ``VmHWM``. Redis round
trips are counted with ``MONITOR`` over a fixed number of sequential requests after the run
(commands run inside Lua scripts are not round trips and are not counted).

Experiments: ``--workers/--threads/--worker-class`` set ``GUNICORN_*``; ``--env KEY=VALUE`` passes
any other setting (e.g. ``RATELIMIT_STRATEGY=moving-window``) to the service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatkit_flask.testing.redis_server import RedisServer, RedisServerMissing  # noqa: E402

RESULTS = ROOT / "bench" / "results"
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
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- processes, /proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_cpu(pid: int) -> float:
    """utime+stime seconds of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int, key: str) -> int:
    """A kB figure from /proc/<pid>/status (VmHWM, VmRSS), 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def machine_jiffies() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before it answered")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port}{path} within {timeout} s")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- Redis


def redis_cmd(port: int, *args: str, db: int | None = None) -> str:
    cmd = ["redis-cli", "-p", str(port)]
    if db is not None:
        cmd += ["-n", str(db)]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()


def bench_redis(port: int | None) -> RedisServer | None:
    """The bench's Redis: a private ``redis-server`` on a free port (returned, for the caller to
    stop), or with ``--redis-port`` a server the user runs, which must answer (None)."""
    if shutil.which("redis-cli") is None:
        raise SystemExit(str(RedisServerMissing("redis-cli")))
    if port is not None:
        if redis_cmd(port, "ping") != "PONG":
            raise SystemExit(f"no Redis answers on 127.0.0.1:{port} (--redis-port)")
        return None
    server = RedisServer()
    try:
        server.start()
    except RedisServerMissing as missing:
        raise SystemExit(str(missing)) from None
    return server


def redis_pid(port: int) -> int | None:
    for line in redis_cmd(port, "info", "server").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


class Monitor:
    """Counts the commands clients send to one Redis db (MONITOR); Lua-internal ones excluded."""

    def __init__(self, port: int, db: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.sendall(b"MONITOR\r\n")
        self._tag = f"[{db} 127.0.0.1:"
        self._buf = b""
        self.commands: Counter[str] = Counter()
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\r\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if self._tag in line:
                    command = line.split("] ", 1)[1].split(" ", 1)[0].strip('"').upper()
                    self.commands[command] += 1

    def close(self) -> Counter[str]:
        time.sleep(0.3)  # let the last lines arrive
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        return self.commands


# --------------------------------------------------------------------------- load generators


WRK_LUA = r"""
-- generated by bench/run.py
local cookies = {%(cookies)s}
local nthreads = %(threads)d
local threads = {}
local counter = 1

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  wrk.method = "POST"
  wrk.body = %(body)s
  %(headers)s
  reqs = {}
  for i = tid, #cookies, nthreads do
    local h = {}
    for k, v in pairs(wrk.headers) do h[k] = v end
    h["Cookie"] = cookies[i]
    table.insert(reqs, wrk.format(nil, nil, h))
  end
  if #reqs == 0 then reqs[1] = wrk.format() end
  idx = 0
end

function request()
  idx = idx %% #reqs + 1
  return reqs[idx]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then
      for k, v in pairs(s) do agg[tostring(k)] = (agg[tostring(k)] or 0) + v end
    end
  end
  local parts = {}
  for k, v in pairs(agg) do table.insert(parts, string.format('"%%s":%%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%%d,"duration_us":%%d,"p50":%%d,"p90":%%d,"p99":%%d,"max":%%d,' ..
    '"mean":%%f,"statuses":{%%s},"socket_errors":{"connect":%%d,"read":%%d,"write":%%d,' ..
    '"timeout":%%d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, table.concat(parts, ","),
    e.connect, e.read, e.write, e.timeout))
end
"""


def lua_string(data: bytes | str) -> str:
    text = data.decode() if isinstance(data, bytes) else data
    return json.dumps(text)  # a JSON string of ASCII is a valid Lua string literal


def run_wrk(
    url: str,
    *,
    body: bytes,
    headers: dict[str, str],
    cookies: list[str],
    connections: int,
    duration: float,
    workdir: Path,
) -> dict[str, Any]:
    threads = min(2, connections)
    script = workdir / "bench.lua"
    header_lines = "\n  ".join(
        f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()
    )
    script.write_text(
        WRK_LUA
        % {
            "cookies": ",".join(lua_string(c) for c in cookies),
            "threads": threads,
            "body": lua_string(body),
            "headers": header_lines,
        }
    )
    cmd = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    line = next((x for x in out.splitlines() if x.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err or out}")
    data = json.loads(line.split(" ", 1)[1])
    seconds = data["duration_us"] / 1e6
    statuses = {int(k): v for k, v in data["statuses"].items()}
    return {
        "client": "wrk",
        "seconds": seconds,
        "responses": sum(statuses.values()),
        "statuses": statuses,
        "socket_errors": {k: v for k, v in data["socket_errors"].items() if v},
        "p50_ms": data["p50"] / 1000,
        "p90_ms": data["p90"] / 1000,
        "p99_ms": data["p99"] / 1000,
        "max_ms": data["max"] / 1000,
        "client_cpu_s": usage.ru_utime + usage.ru_stime,
    }


async def _asyncio_load(
    port: int, path: str, body: bytes, headers: dict[str, str], cookies: list[str],
    connections: int, duration: float,
) -> tuple[list[float], Counter[int], Counter[str]]:  # fmt: skip
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + duration
    base = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    def request_bytes(cookie: str | None) -> bytes:
        extra = f"Cookie: {cookie}\r\n" if cookie else ""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{base}{extra}"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def worker(index: int) -> None:
        payload = request_bytes(cookies[index % len(cookies)] if cookies else None)
        reader = writer = None
        while time.monotonic() < deadline:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                start = time.monotonic()
                writer.write(payload)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                status = int(head[9:12])
                lower = head.lower()
                length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                await reader.readexactly(length)
                latencies.append(time.monotonic() - start)
                statuses[status] += 1
                if b"connection: close" in lower:
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, TimeoutError, IndexError, ValueError):
                errors["read"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(connections)))
    return latencies, statuses, errors


def run_asyncio(
    port: int,
    path: str,
    *,
    body: bytes,
    headers: dict[str, str],
    cookies: list[str],
    connections: int,
    duration: float,
) -> dict[str, Any]:
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    latencies, statuses, errors = asyncio.run(
        _asyncio_load(port, path, body, headers, cookies, connections, duration)
    )
    seconds = time.monotonic() - started
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0
        )

    return {
        "client": "asyncio",
        "seconds": seconds,
        "responses": sum(statuses.values()),
        "statuses": dict(statuses),
        "socket_errors": dict(errors),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1000 if latencies else 0,
        "client_cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
    }


def drive(args: argparse.Namespace, port: int, path: str, body: bytes, headers: dict[str, str],
          cookies: list[str], duration: float, workdir: Path) -> dict[str, Any]:  # fmt: skip
    if args.client == "wrk":
        return run_wrk(
            f"http://127.0.0.1:{port}{path}",
            body=body,
            headers=headers,
            cookies=cookies,
            connections=args.connections,
            duration=duration,
            workdir=workdir,
        )
    return run_asyncio(
        port,
        path,
        body=body,
        headers=headers,
        cookies=cookies,
        connections=args.connections,
        duration=duration,
    )


# --------------------------------------------------------------------------- the service


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


# --------------------------------------------------------------------------- report


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


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def fmt_errors(errors: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "0"


def table(results: list[dict[str, Any]]) -> str:
    ceiling = next((r for r in results if r["variant"] == "ceiling"), None)
    head = (
        "target",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "CPU ms/req",
        "RSS MB/wkr",
        "vs ceiling",
        "+p50 ms",
        "+p99 ms",
        "redis RT/req",
    )
    rows = []
    for r in results:
        is_ceiling = r["variant"] == "ceiling"
        name = "ceiling (fake upstream)" if is_ceiling else f"service {r['variant']}"
        if r.get("tree"):
            name = f"{r['tree']}: {name}"
        if r["variant"] == "limited":
            name += " (429s)"
        rows.append(
            (
                name,
                f"{r['rps']:.0f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p90_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                fmt_errors(r["errors"]),
                "-" if is_ceiling else f"{r['server_cpu_ms_per_request']:.2f}",
                "-" if is_ceiling else f"{r['peak_rss_mb_per_worker']:.1f}",
                "-" if is_ceiling or not ceiling else f"{100 * r['rps'] / ceiling['rps']:.0f}%",
                "-" if is_ceiling or not ceiling else f"{r['p50_ms'] - ceiling['p50_ms']:+.1f}",
                "-" if is_ceiling or not ceiling else f"{r['p99_ms'] - ceiling['p99_ms']:+.1f}",
                "-" if is_ceiling else f"{r['redis_round_trips']['per_request']:g}",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    return "\n".join([line, sep, *body])


def checkout(ref: str, workdir: Path) -> Path:
    """A detached worktree of ``ref`` under ``workdir`` (removed at the end of the run)."""
    path = workdir / "before"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT, check=True,
        capture_output=True,
    )  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Mint throughput/latency of the deployed service vs the upstream's ceiling."
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05, help="fake upstream latency (s)")
    parser.add_argument(
        "--variant", choices=["returning", "new", "limited", "all"], default="returning"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per run")
    parser.add_argument("--client", choices=["auto", "wrk", "asyncio"], default="auto")
    parser.add_argument("--workers", type=int, help="GUNICORN_WORKERS (default: the config's)")
    parser.add_argument("--threads", type=int, help="GUNICORN_THREADS (default: the config's)")
    parser.add_argument("--worker-class", help="GUNICORN_WORKER_CLASS (default: the config's)")
    parser.add_argument(
        "--access-log", choices=["on", "off"], help="GUNICORN_ACCESS_LOG (default: the config's)"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra service setting"
    )
    parser.add_argument(
        "--redis-port",
        type=int,
        help="use the Redis on 127.0.0.1:PORT (its --redis-db is flushed) instead of starting one",
    )
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--label", default="", help="a note stored in the JSON")
    parser.add_argument(
        "--before",
        metavar="REF",
        help="also run each variant from a checkout of git REF (a temporary worktree), "
        "alternating with this tree, against the same upstream in the same run",
    )
    parser.add_argument("--no-json", action="store_true", help="do not write bench/results/")
    parser.add_argument("--keep-logs", action="store_true", help="keep the service logs")
    args = parser.parse_args(argv)
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "asyncio"
    variants = ["returning", "new", "limited"] if args.variant == "all" else [args.variant]

    own_redis = bench_redis(args.redis_port)
    if own_redis is not None:
        args.redis_port = own_redis.port
    workdir = Path(tempfile.mkdtemp(prefix="chatkit-bench-"))
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "chatkit_flask.testing.fake_chatkit", "--port", str(upstream_port),
         "--latency", str(args.latency), "--api-key", API_KEY],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    results: list[dict[str, Any]] = []
    try:
        wait_http(upstream_port, "/", 15, upstream)
        results.append(run_ceiling(args, upstream, upstream_port, workdir))
        before = checkout(args.before, workdir) if args.before else None
        for variant in variants:
            if before is not None:
                results.append(
                    run_variant(
                        args, variant, upstream, upstream_port, workdir, before,
                        f"before {args.before}",
                    )
                )
            results.append(
                run_variant(
                    args, variant, upstream, upstream_port, workdir, ROOT, "after" if before else ""
                )
            )
    finally:
        if args.before:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(workdir / "before")],
                cwd=ROOT, capture_output=True, check=False,
            )  # fmt: skip
        stop(upstream)
        if own_redis is not None:
            own_redis.stop()
        else:
            redis_cmd(args.redis_port, "flushdb", db=args.redis_db)
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)

    settings = gunicorn_settings(args)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    print(
        f"chatkit-flask bench {stamp}: {args.connections} connections x {args.duration:g} s, "
        f"upstream latency {args.latency * 1000:g} ms, client {args.client}; gunicorn "
        f"{settings['worker_class']} workers={settings['workers']} threads={settings['threads']} "
        f"access_log={'on' if settings['accesslog'] else 'off'}"
        + (f"; env {' '.join(args.env)}" if args.env else "")
    )
    print(table(results))
    for r in results[1:]:
        rt = r["redis_round_trips"]
        cmds = " ".join(f"{k}={v:g}" for k, v in rt["commands_per_request"].items())
        print(
            f"  {r.get('tree') or ''} {r['variant']}: "
            f"redis round trips/req {rt['per_request']:g} ({cmds}); "
            f"server {r['server_cpu_cores']:.2f} cores, upstream {r['upstream_cpu_cores']:.2f}, "
            f"client {r['client_cpu_cores']:.2f}, "
            f"redis {r['redis_cpu_ms_per_request']:.3f} ms/req; "
            f"machine {r['machine_busy_pct']:.0f}% busy, other jobs {r['other_cpu_cores']:.2f} "
            f"cores; workers {r['workers']}" + (" (RESTARTED)" if r["workers_restarted"] else "")
        )
    c = results[0]
    print(
        f"  ceiling: upstream {c['upstream_cpu_cores']:.2f} cores, "
        f"client {c['client_cpu_cores']:.2f}"
    )
    if not args.no_json:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{stamp}.json"
        out.write_text(
            json.dumps(
                {
                    "timestamp": stamp,
                    "label": args.label,
                    "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                    "machine": machine(),
                    "args": {k: v for k, v in vars(args).items()},
                    "gunicorn": settings,
                    "results": results,
                },
                indent=2,
                default=str,
            )
        )
        print(f"  json: {out.relative_to(ROOT)}")
    bad = [r for r in results if r["errors"] or not r["rps"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
