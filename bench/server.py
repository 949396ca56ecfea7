"""Server mode under load: ours against OpenAI's official sample server, one command, one run.

    bench/setup_official.sh        # once: the official sample under /tmp/peer (needs MIRROR=...)
    .venv/bin/python bench/server.py [--visitors 16,64] [--think 1] [--duration 15] [--capacity]
        [--ours-cmd CMD | env CHATKIT_BENCH_OURS_CMD=CMD] [--env KEY=VALUE] [--no-official]

All on 127.0.0.1, the same fake model for both (``chatkit_flask.testing.fake_responses``, an echo,
one text delta per word, ``--token-delay`` 5 ms apart):

- **ours**: ``gunicorn -c config/gunicorn.conf.py wsgi:app`` as shipped (``--ours-cmd`` runs another
  command, by bash in the repository root, with ``$BENCH_PORT`` and ``GUNICORN_BIND`` set),
  server mode, the Redis store and Flask-Limiter's limits in a private ``redis-server``, limits
  on (high enough never to refuse; stream caps at their defaults), each visitor its own
  ``X-Forwarded-For`` address behind ``CHATKIT_TRUSTED_PROXIES=1``;
- **official**: openai-chatkit-advanced-samples' customer-support backend, pinned and unmodified
  (``bench/setup_official.sh``), ``uvicorn app.main:app``: one process, in-memory store, no limits.
  Both make one title call per new thread besides the answers.

For each ``--visitors`` level: that many visitors, each creating a thread and adding messages to
it (a new thread every ``--messages-per-thread``), thinking ``--think`` seconds between messages;
first the same callers straight at the fake model (its own time to first delta: the floor), then
each server (the order alternates between levels). Reported per server: messages/s; server CPU
per message (utime+stime of its whole process group); time to first text delta **added** over
the model's own at the same percentile; peak RSS and PSS of its processes; errors. Per server
also its **idle PSS** (``/proc/<pid>/smaps_rollup``, all processes, after a warm-up).

``--capacity``: a second fake with long replies (``--cap-words`` deltas ``--cap-token-delay``
apart, ~10 s) and fresh servers. At N open streams (each visitor restarts its stream when it
ends, starts spread over one stream's length), streams started in the next ``--cap-window``
seconds (longer at small N: at least ``--cap-samples`` of them) must get their first delta
within ``--cap-margin-ms`` (p99) of the model's own with N streams open on it, with at most 1 %
errors. N doubles from ``--cap-start`` until that fails (halves when the start fails),
then bisects: the capacity is the largest N that passes.

Prints the tables (markdown) and the ratio ours/official; writes bench/results/server-*.json.
The parts: ``servers.py`` (the processes), ``chat_load.py`` (visitors on raw sockets),
``server_measure.py`` (levels, capacity, memory), ``server_report.py`` (the tables).
The machine's load is printed with the figures: absolute figures move with other jobs, the ratio
between two servers in one run holds better.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chat_load import Caller, ModelCaller, Result, Visitor
from procs import machine, machine_jiffies
from redis_tools import bench_redis, redis_cmd
from server_measure import capacity, idle_memory, log, throughput, warm_up
from server_report import capacity_table, memory_table, ratios, throughput_table
from servers import OFFICIAL_DIR, OFFICIAL_PYTHON, Served, fake_model, official_server, our_server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def wait_quiet(limit: float, max_busy: float = 0.5) -> float:
    """Wait (at most ``limit`` s) until other jobs use under ``max_busy`` cores; return theirs."""
    deadline = time.monotonic() + limit
    while True:
        a = machine_jiffies()
        time.sleep(2)
        b = machine_jiffies()
        busy = (os.cpu_count() or 1) * (b[0] - a[0]) / max(1, b[1] - a[1])
        if busy < max_busy or time.monotonic() > deadline:
            log(f"  machine: {busy:.2f} cores busy, load average {os.getloadavg()[0]:.2f}")
            return busy
        log(f"  waiting for a quieter machine: {busy:.2f} cores busy")
        time.sleep(5)


def start_targets(
    args: argparse.Namespace, fake: Served, workdir: Path, redis: str, started: list[Served]
) -> list[Served]:
    started.append(our_server(fake, workdir, redis, args.ours_cmd, args.env))
    if not args.no_official:
        started.append(official_server(fake, workdir, args.official_dir, args.official_python))
    return started[-(1 if args.no_official else 2) :]


async def run(args: argparse.Namespace, workdir: Path, redis: str) -> dict[str, Any]:
    out: dict[str, Any] = {"throughput": [], "memory": {}, "capacity": []}
    started: list[Served] = []
    try:
        fake = fake_model(workdir, args.token_delay)
        started.append(fake)
        targets = start_targets(args, fake, workdir, redis, started)
        for server in targets:
            out["memory"][server.name] = await idle_memory(server, args.text)
            out["info"] = {**out.get("info", {}), server.name: server.info}
            log(f"  {server.name}: idle PSS {out['memory'][server.name]['idle_pss_mb']:.0f} MB")
        for i, n in enumerate(args.visitors):
            floor = await throughput(lambda: ModelCaller(fake.port, args.text), n, None, fake, args)
            out["throughput"].append({"target": "model", "visitors": n, **floor})
            for server in targets[i % len(targets) :] + targets[: i % len(targets)]:

                def make(s: Served = server) -> Caller:
                    return Visitor(
                        s.port,
                        s.path,
                        args.text,
                        own_address=True,
                        messages_per_thread=args.messages_per_thread,
                    )

                row = await throughput(make, n, server, fake, args)
                row.update(
                    target=server.name,
                    visitors=n,
                    added_p50_ms=row["ttfd_p50_ms"] - floor["ttfd_p50_ms"],
                    added_p99_ms=row["ttfd_p99_ms"] - floor["ttfd_p99_ms"],
                )
                out["throughput"].append(row)
                log(
                    f"  {server.name} x{n}: {row['msg_s']:.1f} msg/s, {row['cpu_ms_msg']:.1f} ms "
                    f"CPU/msg, added p50/p99 {row['added_p50_ms']:+.0f}/{row['added_p99_ms']:+.0f}"
                    f" ms, errors {row['errors'] or 0}"
                )
        for s in reversed(started):
            s.stop()
        started.clear()
        if args.capacity:
            for db in (0, 1):
                redis_cmd(args.redis_port, "flushdb", db=db)
            slow = fake_model(workdir, args.cap_token_delay, args.cap_words)
            started.append(slow)
            first = Result("model")
            caller = ModelCaller(slow.port, args.cap_text)
            await caller.message(first)
            await caller.close()
            ramp = args.cap_ramp or first.total_s or 10.0
            log(f"  capacity: one stream lasts {first.total_s:.1f} s; ramp {ramp:.1f} s")
            floors: dict[int, dict[str, Any]] = {}
            for server in start_targets(args, slow, workdir, redis, started):
                await warm_up(server, "hello")
                out["capacity"].append(await capacity(server, slow, args, ramp, floors))
                server.stop()
            out["capacity_stream_s"] = first.total_s
    finally:
        for s in reversed(started):
            s.stop()
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--visitors", type=ints, default=[16, 64], help="levels (default 16,64)")
    p.add_argument("--think", type=float, default=1.0, help="seconds between messages")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    p.add_argument("--messages-per-thread", type=int, default=5)
    p.add_argument("--text", default="hello, I need help with my trip", help="echoed by the model")
    p.add_argument("--token-delay", type=float, default=0.005, help="model's seconds per delta")
    p.add_argument("--capacity", action="store_true", help="also find the open-stream capacity")
    p.add_argument("--cap-words", type=int, default=400, help="deltas per long reply")
    p.add_argument("--cap-token-delay", type=float, default=0.025)
    p.add_argument("--cap-text", default="tell me a long story")
    p.add_argument("--cap-start", type=int, default=16)
    p.add_argument("--cap-max", type=int, default=2048)
    p.add_argument("--cap-levels", type=ints, help="these levels instead of the search")
    p.add_argument("--cap-resolution", type=int, default=8)
    p.add_argument("--cap-window", type=float, default=12.0)
    p.add_argument("--cap-samples", type=int, default=100, help="new streams per level, at least")
    p.add_argument("--cap-ramp", type=float, help="seconds (default: one stream's length)")
    p.add_argument("--cap-margin-ms", type=float, default=100.0)
    p.add_argument(
        "--ours-cmd",
        default=os.environ.get("CHATKIT_BENCH_OURS_CMD"),
        help="command for ours (bash, in the repo root; listen on $BENCH_PORT)",
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra setting for ours"
    )
    p.add_argument("--no-official", action="store_true", help="measure ours only")
    p.add_argument("--official-dir", type=Path, default=OFFICIAL_DIR)
    p.add_argument("--official-python", type=Path, default=OFFICIAL_PYTHON)
    p.add_argument("--redis-port", type=int, help="a Redis you run (its dbs 0-1 are flushed)")
    p.add_argument(
        "--quiet-wait", type=float, default=120.0, help="seconds to wait for a quiet machine"
    )
    p.add_argument("--label", default="")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="chatkit-bench-server-"))
    own_redis = bench_redis(args.redis_port)
    if own_redis is not None:
        args.redis_port = own_redis.port
    busy_before = wait_quiet(args.quiet_wait) if args.quiet_wait else 0.0
    load_before, started_at = os.getloadavg(), datetime.now(UTC)
    try:
        out = asyncio.run(run(args, workdir, f"redis://127.0.0.1:{args.redis_port}"))
    finally:
        if own_redis is not None:
            own_redis.stop()
        else:
            for db in (0, 1):
                redis_cmd(args.redis_port, "flushdb", db=db)
        if args.keep:
            log(f"logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    print(
        f"chatkit-flask server bench {started_at:%Y-%m-%d %H:%M} - {datetime.now(UTC):%H:%M} UTC;"
        f" nproc {os.cpu_count()}; {busy_before:.2f} cores busy before; load average "
        f"{load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; model {args.token_delay * 1000:g} ms per delta; think "
        f"{args.think:g} s; {args.duration:g} s per level"
        + (f"; ours: {args.ours_cmd}" if args.ours_cmd else "")
        + (f"; env {' '.join(args.env)}" if args.env else "")
    )
    official = out.get("info", {}).get("official")
    if official:
        print(f"official: customer-support at {official['commit']}, {official['packages']}")
    print()
    print(throughput_table(out["throughput"]))
    for line in ratios(out["throughput"]):
        print(line)
    print()
    print(memory_table(out["memory"], out["capacity"]))
    if out["capacity"]:
        print(f"\ncapacity levels (streams of {out['capacity_stream_s']:.1f} s):")
        print(capacity_table(out["capacity"]))
    if not args.no_json:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"server-{stamp}.json"
        path.write_text(
            json.dumps(
                {
                    "timestamp": stamp,
                    "label": args.label,
                    "command": " ".join(sys.argv),
                    "machine": machine(),
                    "busy_before": busy_before,
                    "load_before": load_before,
                    "load_after": load_after,
                    "args": vars(args),
                    **out,
                },
                indent=2,
                default=str,
            )
        )
        print(f"json: {path.relative_to(ROOT)}")
    bad = [r for r in out["throughput"] if r["errors"] or not r["messages"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
