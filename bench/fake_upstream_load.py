"""Load-test the fake ChatKit API (``chatkit_flask.testing.fake_chatkit``) on its own.

Starts the CLI server in a subprocess, drives it with N keep-alive connections for D seconds and
prints req/s, latency percentiles and the CPU used by server and client::

    .venv/bin/python bench/fake_upstream_load.py --connections 64 --latency 0.05 --duration 5
    .venv/bin/python bench/fake_upstream_load.py --client requests --connections 64

``--client asyncio`` (default) uses raw asyncio sockets so that the client is cheap;
``--client requests`` uses one thread + ``requests.Session`` per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BODY = json.dumps({"user": "bench-user", "workflow": {"id": "wf_bench"}}).encode()
HEADERS = {"Authorization": "Bearer sk-bench", "OpenAI-Beta": "chatkit_beta=v1"}


def proc_cpu(pid: int) -> float:
    """User+system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all cores from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def asyncio_client(port: int, conns: int, duration: float) -> list[float]:
    head = (
        "POST /v1/chatkit/sessions HTTP/1.1\r\nHost: bench\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
        + f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    request = head + BODY
    latencies: list[float] = []
    deadline = time.monotonic() + duration

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while (start := time.monotonic()) < deadline:
            writer.write(request)
            resp_head = await reader.readuntil(b"\r\n\r\n")
            assert resp_head.startswith(b"HTTP/1.1 200"), resp_head[:40]
            length = int(resp_head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            latencies.append(time.monotonic() - start)
        writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return latencies


def requests_client(base_url: str, conns: int, duration: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + duration

    def worker() -> None:
        with requests.Session() as http:
            while (start := time.monotonic()) < deadline:
                r = http.post(f"{base_url}/v1/chatkit/sessions", data=BODY, headers=HEADERS)
                assert r.status_code == 200 and r.json()["client_secret"]
                latencies.append(time.monotonic() - start)

    threads = [threading.Thread(target=worker) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--client", choices=["asyncio", "requests"], default="asyncio")
    args = parser.parse_args()

    cmd = [sys.executable, "-m", "chatkit_flask.testing.fake_chatkit", "--port", "0"]
    cmd += ["--latency", str(args.latency), "--api-key", "sk-bench"]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            base_url = server.stdout.readline().split()[-1]
            port = int(base_url.rsplit(":", 1)[1])
            srv0, cli0, mach0 = proc_cpu(server.pid), self_cpu(), machine_busy()
            t0 = time.monotonic()
            if args.client == "asyncio":
                lat = asyncio.run(asyncio_client(port, args.connections, args.duration))
            else:
                lat = requests_client(base_url, args.connections, args.duration)
            wall = time.monotonic() - t0
            srv_cpu, cli_cpu = proc_cpu(server.pid) - srv0, self_cpu() - cli0
            mach1 = machine_busy()
            busy = 100 * (mach1[0] - mach0[0]) / max(1, mach1[1] - mach0[1])
        finally:
            server.terminate()
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    ideal = args.connections / args.latency if args.latency else float("inf")
    print(
        f"client={args.client} conns={args.connections} latency={args.latency}s "
        f"requests={len(lat)} wall={wall:.2f}s -> {len(lat) / wall:.0f} req/s "
        f"(ideal {ideal:.0f}); p50={pct(0.5):.1f}ms p99={pct(0.99):.1f}ms; "
        f"server CPU {100 * srv_cpu / wall:.0f}% of a core, client CPU {100 * cli_cpu / wall:.0f}%"
        f"; machine {busy:.0f}% busy over {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
