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

The parts, one concern each: ``procs.py`` (processes, /proc), ``redis_tools.py`` (the bench's
Redis, MONITOR), ``mint_load.py`` (wrk or the asyncio client), ``mint_service.py`` (the service
as deployed, the ceiling), ``mint_report.py`` (table, JSON). Server mode has its own command:
``bench/server.py``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mint_report import print_report
from mint_service import API_KEY, ROOT, checkout, gunicorn_settings, run_ceiling, run_variant
from procs import free_port, stop, wait_http
from redis_tools import bench_redis, redis_cmd


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
    print_report(args, argv, settings, results, stamp)
    bad = [r for r in results if r["errors"] or not r["rps"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
