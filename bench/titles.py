"""Thread titles and reply latency: time to the first text delta of a new thread, titles off
against titles on (``CHATKIT_TITLE_MODEL`` unset: the agent's model), same machine, same run.

    .venv/bin/python bench/titles.py [--visitors 1,8] [--duration 10] [--rounds 2] [--workers N]

A fake Responses API (``--token-delay`` between its ``--tokens`` deltas) and our service twice
(``gunicorn -c config/gunicorn.conf.py wsgi:app`` as shipped, threads in SQLite, limits in a
private redis-server), identical but for ``CHATKIT_TITLE_MODEL``. For each visitor count and
round, both services get the same closed-loop load in turn: every message is ``threads.create``
(a new thread: with titles on, each one is titled after its answer). Reports p50/p99 time to
the first text delta and to the stream's end, errors, and how many of one visitor's threads got
a model-made title. Writes nothing; the figure goes into docs/benchmark.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from chat_load import Result, Visitor, closed_loop, percentile
from servers import ROOT, Served, fake_model, our_server

sys.path.insert(0, str(ROOT))

from chatkit_flask.testing.redis_server import RedisServer

MODES = {"titles off": ["CHATKIT_TITLE_MODEL=off"], "titles on": []}


def model_titled(server: Served, cookie: str) -> tuple[int, int]:
    """(threads whose title the model made, threads) of one visitor: the fake echoes, so a
    model title starts "You said"; the fallback is the message's start."""
    body = json.dumps({"type": "threads.list", "params": {"limit": 100}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{server.path}", data=body,
        headers={"Content-Type": "application/json", "Cookie": cookie},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as answer:
        threads = json.load(answer)["data"]
    return sum((t.get("title") or "").startswith("You said") for t in threads), len(threads)


def words(tokens: int) -> str:
    """A message the fake echoes in ``tokens`` deltas ("You said:" is two of them)."""
    return " ".join(f"word{i}" for i in range(max(1, tokens - 2)))


def measure(server: Served, visitors: int, args: argparse.Namespace) -> dict[str, Any]:
    async def load() -> tuple[list[Result], str]:
        callers = [Visitor(server.port, server.path, words(args.tokens), messages_per_thread=1)
                   for _ in range(visitors)]  # fmt: skip
        await closed_loop(callers, 1.0, 0.0, lambda r: None)  # warm-up; each gets its cookie
        results: list[Result] = []
        await closed_loop(callers, args.duration, 0.0, results.append)
        cookie = "; ".join(f"{k}={v}" for k, v in callers[0].conn.cookies.items())
        for caller in callers:
            await caller.close()
        return results, cookie

    results, cookie = asyncio.run(load())
    ok = [r for r in results if r.ok]
    return {
        "first": [r.first_delta_s for r in ok if r.first_delta_s is not None],
        "total": [r.total_s for r in ok if r.total_s is not None],
        "errors": sum(1 for r in results if not r.ok),
        "titled": model_titled(server, cookie),
    }


def row(name: str, visitors: int, runs: list[dict[str, Any]]) -> str:
    first = [x * 1000 for r in runs for x in r["first"]]
    total = [x * 1000 for r in runs for x in r["total"]]
    titled = sum(r["titled"][0] for r in runs), sum(r["titled"][1] for r in runs)
    errors = sum(r["errors"] for r in runs)
    return (f"| {name} | {visitors} | {len(first)} | {percentile(first, 50):.1f} | "
            f"{percentile(first, 99):.1f} | {percentile(total, 50):.1f} | "
            f"{percentile(total, 99):.1f} | {titled[0]} of {titled[1]} | {errors} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visitors", default="1,8", help="closed-loop visitors (default 1,8)")
    parser.add_argument("--duration", type=float, default=10, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per mode, alternating")
    parser.add_argument("--tokens", type=int, default=20, help="deltas per answer (default 20)")
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds between deltas")
    parser.add_argument("--workers", type=int, help="gunicorn workers (default: as shipped)")
    args = parser.parse_args(argv)
    visitor_counts = [int(v) for v in args.visitors.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-titles-") as tmp, RedisServer() as redis:
        workdir = Path(tmp)
        fake = fake_model(workdir, args.token_delay)
        servers: dict[str, Served] = {}
        try:
            workers = [f"GUNICORN_WORKERS={args.workers}"] if args.workers else []
            for db, (name, extra) in enumerate(MODES.items(), start=1):
                store = f"CHATKIT_STORE_URL=sqlite:///{workdir}/{db}.db"
                servers[name] = our_server(fake, workdir, f"redis://127.0.0.1:{redis.port}",
                                           None, [store, *extra, *workers], name=name)  # fmt: skip
            results: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for visitors in visitor_counts:
                for _ in range(args.rounds):
                    for name, server in servers.items():  # alternating: noise hits both
                        run = measure(server, visitors, args)
                        results.setdefault((name, visitors), []).append(run)
        finally:
            for server in servers.values():
                server.stop()
            fake.stop()
    print(f"\n{args.tokens} deltas {args.token_delay * 1000:g} ms apart; {args.rounds} x "
          f"{args.duration:g} s per mode and visitor count; every message a new thread\n")
    print("| mode | visitors | messages | first delta p50 ms | p99 ms | stream end p50 ms | "
          "p99 ms | threads titled by the model | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, visitors), runs in results.items():
        print(row(name, visitors, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
