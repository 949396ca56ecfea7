"""Server mode against OpenAI's official sample server: same machine, same run, same fake model.

One command (the official sample is a git directory, e.g. what the project's ``fetch`` tool
gives for ``github:openai/openai-chatkit-advanced-samples``, or ``git clone --bare`` of it)::

    .venv/bin/python bench/server.py --official-repo PATH [--official-venv DIR]
        [--concurrency 16,64] [--duration 10] [--capacity 50,100,200,300]
        [--capacity-also GUNICORN_THREADS=128]   # a variant of ours for the capacity steps

All on loopback, alternating targets so that noise on the shared machine hits each of them:

1. **Throughput**: a fake Responses API (``chatkit_flask.testing.fake_responses``) answering
   ``--tokens`` deltas ``--token-delay`` apart; then for each concurrency, visitors each sending
   ``threads.create`` again as soon as the answer ended, to: the fake itself (its own time to
   first delta), ours with the SQLite store, the official server, ours with the Redis store (db 3).
   Ours is ``gunicorn -c config/gunicorn.conf.py wsgi:app`` as shipped, limits on in Redis db 6.
2. **Capacity**: a second fake with ``--capacity-token-delay`` (slow replies), fresh servers;
   for each step, N visitors open long streams (``--capacity-tokens`` deltas, started over
   N/60 s, at most 5 s), and while all are held, ``--probes`` visitors send short messages for
   ``--capacity-window`` seconds: their time to first delta, against the fake's own with the
   same N held, says whether the instance still answers promptly. RSS per stream is (RSS with
   N held - RSS after the warm-up) / N, summed over the server's processes.

Per target: messages/s, server CPU per message (utime+stime from /proc of every process of the
server), RSS, time to first text delta at the client, and the **added** time to first delta
(ours minus the fake's own, at the same concurrency), errors. Writes bench/results/server-*.json.
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

from run import bench_redis, machine, machine_jiffies, redis_cmd
from servers import Served, fake_model, official_server, official_venv, our_server
from sse_load import Target, get_cookies, percentile, run_load

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LIMITS_DB, STORE_DB = 6, 3
CHATKIT_DELTA = b"assistant_message.content_part.text_delta"
CHATKIT_DONE = b"thread.item.done"


def words(tokens: int) -> str:
    """A message the fake echoes in ``tokens`` deltas ("You said:" is two of them)."""
    return " ".join(f"word{i}" for i in range(max(1, tokens - 2)))


def target_for(server: Served, text: str, cookies: list[str]) -> Target:
    if server.name == "fake model":
        body = {
            "model": "gpt-4.1-mini",
            "stream": True,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}],
        }
        return Target(server.port, server.path, json.dumps(body).encode(),
                      b"response.output_text.delta", b"response.completed")  # fmt: skip
    body = {"type": "threads.create", "params": {"input": {
        "content": [{"type": "input_text", "text": text}], "attachments": [],
        "inference_options": {}}}}  # fmt: skip
    return Target(server.port, server.path, json.dumps(body).encode(), CHATKIT_DELTA,
                  CHATKIT_DONE, tuple(cookies))  # fmt: skip


def measure(
    server: Served, fake: Served, visitors: int, text: str, *, ramp: float, warmup: float,
    duration: float, drain: bool = True, held: int = 0, held_text: str = "",
    held_ramp: float = 0.0, settle: float = 2.0,
) -> dict[str, Any]:  # fmt: skip
    """One load run against ``server``; readings taken at the edges of the measured window.

    With ``held``, that many other visitors first open long streams (``held_text``, started
    over ``held_ramp`` seconds), and the ``visitors`` run while those stay open.
    """
    cookies = []
    if server.cookie_path:
        cookies = asyncio.run(get_cookies(server.port, server.cookie_path,
                                          "chatkit_session_id", visitors + held))  # fmt: skip
    marks: dict[str, dict[str, Any]] = {}

    def on_window(edge: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        marks[edge] = {
            "t": time.monotonic(), "cpu": server.cpu(), "fake": fake.cpu(),
            "client": usage.ru_utime + usage.ru_stime, "machine": machine_jiffies(),
            "rss_kb": server.rss_kb(), "pss_kb": server.pss_kb(),
        }  # fmt: skip

    target = target_for(server, text, cookies[held:])
    holders = target_for(server, held_text, cookies[:held])

    async def go() -> tuple[Any, list[Any]]:
        holding = None
        if held:
            holding = asyncio.create_task(run_load(
                holders, held, ramp=held_ramp, warmup=0, on_window=lambda _: None, drain=False,
                duration=settle + ramp + warmup + duration + 5))  # fmt: skip
            await asyncio.sleep(held_ramp + settle)
        result = await run_load(target, visitors, ramp=ramp, warmup=warmup, duration=duration,
                                on_window=on_window, drain=drain)  # fmt: skip
        return result, (await holding)[0] if holding else []

    (messages, errors, w0, w1), holder_msgs = asyncio.run(go())
    open_streams = sum(1 for m in holder_msgs if m.headers_s is not None and
                       m.started + m.headers_s <= w1 and
                       (m.total_s is None or m.started + m.total_s > w1))  # fmt: skip
    queued = sum(1 for m in holder_msgs if not m.error and m.started <= w1 and
                 (m.headers_s is None or m.started + m.headers_s > w1))  # fmt: skip
    a, b = marks["start"], marks["end"]
    seconds = b["t"] - a["t"]
    done = [m for m in messages if m.ok and m.total_s is not None and
            w0 <= m.started + m.total_s <= w1]  # fmt: skip
    started = [m for m in messages if w0 <= m.started < w1]
    ttfe = [m.first_delta_s for m in started if m.first_delta_s is not None and not m.error]
    waiting = sum(1 for m in started if m.first_delta_s is None and not m.error)
    failed = [m.error for m in started if m.error]
    busy = (
        (os.cpu_count() or 1)
        * (b["machine"][0] - a["machine"][0])
        / max(1, b["machine"][1] - a["machine"][1])
    )
    cpu = b["cpu"] - a["cpu"]
    return {
        "target": server.name, "visitors": visitors, "seconds": round(seconds, 2),
        "messages": len(done), "messages_per_s": len(done) / seconds,
        "server_cpu_ms_per_message": 1000 * cpu / max(1, len(done)),
        "server_cores": cpu / seconds, "fake_cores": (b["fake"] - a["fake"]) / seconds,
        "client_cores": (b["client"] - a["client"]) / seconds, "machine_busy_cores": busy,
        "other_cores": max(0.0, busy - (cpu + b["fake"] - a["fake"] + b["client"]
                                        - a["client"]) / seconds),
        "ttfe_p50_ms": 1000 * percentile(ttfe, 50), "ttfe_p99_ms": 1000 * percentile(ttfe, 99),
        "ttfe_samples": len(ttfe), "waiting_at_end": waiting, "held": held,
        "held_open": open_streams, "held_queued": queued,
        "held_errors": sum(1 for m in holder_msgs if m.error),
        "headers_p50_ms": 1000 * percentile([m.headers_s for m in started if m.headers_s], 50),
        "rss_mb": b["rss_kb"] / 1024, "pss_mb": b["pss_kb"] / 1024, "errors": len(failed),
        "error_kinds": {k: failed.count(k) for k in set(failed)},
        "run_errors": dict(errors),
    }  # fmt: skip


def added(rows: list[dict[str, Any]]) -> None:
    """Subtract the fake's own time to first delta at the same load from every other row."""
    own = {r["visitors"]: r for r in rows if r["target"] == "fake model"}
    for r in rows:
        base = own.get(r["visitors"])
        if base and r["target"] != "fake model":
            r["added_p50_ms"] = r["ttfe_p50_ms"] - base["ttfe_p50_ms"]
            r["added_p99_ms"] = r["ttfe_p99_ms"] - base["ttfe_p99_ms"]


def table(rows: list[dict[str, Any]], capacity: bool = False) -> str:
    head = ["target", "visitors" if not capacity else "held streams", "msg/s", "CPU ms/msg",
            "server cores", "TTFE p50 ms", "TTFE p99 ms", "+p50 ms", "+p99 ms", "RSS MB",
            "errors", "other cores"]  # fmt: skip
    if capacity:
        head[9] = "RSS MB (+MB/stream)"
    out = []
    for r in rows:
        rss = f"{r['rss_mb']:.0f}"
        if capacity and "mb_per_stream" in r:
            rss += f" (+{r['mb_per_stream']:.2f})"
        err = str(r["errors"]) + (f" {r['error_kinds']}" if r["errors"] else "")
        if r.get("waiting_at_end"):
            err += f"; {r['waiting_at_end']} waiting"
        fake = r["target"] == "fake model"
        held = str(r["visitors"])
        if capacity:
            held += f" ({r['held_open']} open, {r['held_queued']} queued)"
        out.append([r["target"], held, f"{r['messages_per_s']:.1f}",
                    "-" if fake else f"{r['server_cpu_ms_per_message']:.1f}",
                    f"{r['server_cores']:.2f}", f"{r['ttfe_p50_ms']:.0f}",
                    f"{r['ttfe_p99_ms']:.0f}",
                    f"{r['added_p50_ms']:+.0f}" if "added_p50_ms" in r else "-",
                    f"{r['added_p99_ms']:+.0f}" if "added_p99_ms" in r else "-",
                    rss, err, f"{r['other_cores']:.2f}"])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in out]
    return "\n".join(lines)


def rotate(items: list[Any], n: int) -> list[Any]:
    return items[n % len(items) :] + items[: n % len(items)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--official-repo", type=Path, help="git dir of openai-chatkit-advanced-samples")
    p.add_argument("--official-venv", type=Path, help="reuse this virtualenv for the sample")
    p.add_argument("--concurrency", default="16,64", help="visitors per throughput run")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--tokens", type=int, default=20, help="deltas per reply")
    p.add_argument("--token-delay", type=float, default=0.02)
    p.add_argument("--rounds", type=int, default=1, help="throughput runs per target")
    p.add_argument("--stores", default="sqlite,redis", help="our stores to measure")
    p.add_argument("--capacity", default="50,100,200,300", help="open streams per step ('' off)")
    p.add_argument("--capacity-tokens", type=int, default=50, help="deltas per held stream")
    p.add_argument("--capacity-window", type=float, default=10.0, help="probe seconds per step")
    p.add_argument("--probes", type=int, default=8, help="visitors probing while streams are held")
    p.add_argument("--probe-tokens", type=int, default=4)
    p.add_argument("--capacity-token-delay", type=float, default=0.5)
    p.add_argument(
        "--capacity-also",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also hold the streams on ours with this setting (e.g. GUNICORN_THREADS=128)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for our service (e.g. GUNICORN_THREADS=128)",
    )
    p.add_argument(
        "--redis-port",
        type=int,
        help="use the Redis on 127.0.0.1:PORT (dbs 3 and 6 flushed) instead of starting one",
    )
    p.add_argument("--label", default="")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    if args.official_repo is None:
        p.error("--official-repo is required: a git dir of openai/openai-chatkit-advanced-samples")

    workdir = Path(tempfile.mkdtemp(prefix="chatkit-bench-server-"))
    python = official_venv(args.official_venv, workdir)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    steps = [int(c) for c in args.capacity.split(",") if c]
    stores = [s for s in args.stores.split(",") if s]
    throughput: list[dict[str, Any]] = []
    capacity: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    info: dict[str, Any] = {}
    servers: list[Served] = []

    def ours(name: str, fake: Served, store: str, extra: tuple[str, ...] = ()) -> Served:
        url = (f"sqlite:///{workdir}/threads-{len(servers)}.db" if store == "sqlite"
               else f"{redis}/{STORE_DB}")  # fmt: skip
        return our_server(name, fake, url, workdir, f"{redis}/{LIMITS_DB}", [*args.env, *extra])

    def flush() -> None:
        for db in (LIMITS_DB, STORE_DB):
            redis_cmd(args.redis_port, "flushdb", db=db)

    own_redis = bench_redis(args.redis_port)
    if own_redis is not None:
        args.redis_port = own_redis.port
    redis = f"redis://127.0.0.1:{args.redis_port}"
    try:
        flush()
        fake = fake_model(args.token_delay, workdir)
        servers.append(fake)
        targets = [fake]
        for store in stores:
            servers.append(ours(f"ours ({store})", fake, store))
            targets.append(servers[-1])
        servers.append(official_server(args.official_repo, python, fake, workdir))
        official = servers[-1]
        info["official"] = official.info
        targets.insert(2, official)
        text = words(args.tokens)
        for s in targets[1:]:  # warm up: lazy imports, pydantic schemas, connections, threads
            measure(s, fake, 48, text, ramp=1.0, warmup=0, duration=5, drain=True)
        for rnd in range(args.rounds):
            for i, level in enumerate(levels):
                order = [fake, *rotate(targets[1:], rnd + i)]
                for s in order:
                    row = measure(s, fake, level, text, ramp=1.0, warmup=args.warmup,
                                  duration=args.duration, drain=True)  # fmt: skip
                    row["round"] = rnd
                    throughput.append(row)
                    print(f"  {s.name} x{level}: {row['messages_per_s']:.1f} msg/s, "
                          f"{row['server_cpu_ms_per_message']:.1f} ms CPU/msg, "
                          f"TTFE p50 {row['ttfe_p50_ms']:.0f} ms, errors {row['errors']}",
                          file=sys.stderr, flush=True)  # fmt: skip
        for s in reversed(servers):
            s.stop()
        servers.clear()
        added(throughput)

        if steps:
            flush()
            slow = fake_model(args.capacity_token_delay, workdir)
            servers.append(slow)
            mine = ours("ours (sqlite)", slow, "sqlite")
            servers.append(mine)
            theirs = official_server(args.official_repo, python, slow, workdir)
            servers.append(theirs)
            held = [mine, theirs]
            if args.capacity_also:
                name = f"ours (sqlite, {' '.join(args.capacity_also)})"
                servers.append(ours(name, slow, "sqlite", tuple(args.capacity_also)))
                held.append(servers[-1])
            long_text = words(args.capacity_tokens)
            for s in held:
                measure(s, slow, 48, words(4), ramp=1.0, warmup=0, duration=5, drain=True)
            time.sleep(1)
            idle = {s.name: s.rss_kb() for s in held}
            for i, n in enumerate(steps):
                for s in [slow, *rotate(held, i)]:
                    row = measure(s, slow, args.probes, words(args.probe_tokens), ramp=0.5,
                                  warmup=0, duration=args.capacity_window, held=n,
                                  held_text=long_text, held_ramp=min(5.0, n / 60))  # fmt: skip
                    row["visitors"] = n
                    if s is not slow:
                        row["mb_per_stream"] = (row["rss_mb"] * 1024 - idle[s.name]) / 1024 / n
                        row["idle_rss_mb"] = idle[s.name] / 1024
                    capacity.append(row)
                    print(f"  capacity {s.name} x{n}: open {row['held_open']} queued "
                          f"{row['held_queued']}; probe TTFE p50 {row['ttfe_p50_ms']:.0f} ms "
                          f"p99 {row['ttfe_p99_ms']:.0f} ms, errors {row['errors']}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    time.sleep(2)  # let cancelled streams finish cleaning up
            added(capacity)
    finally:
        for s in reversed(servers):
            s.stop()
        if own_redis is not None:
            own_redis.stop()
        else:
            flush()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs: {workdir}", file=sys.stderr)

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    load_after = os.getloadavg()
    print(f"chatkit-flask server bench {stamp}: {args.tokens} tokens x "
          f"{args.token_delay * 1000:g} ms; nproc {os.cpu_count()}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
          + (f"; env {' '.join(args.env)}" if args.env else ""))  # fmt: skip
    print(f"official: {info.get('official')}")
    print(table(throughput))
    if capacity:
        print(
            f"\ncapacity: each stream {args.capacity_tokens} tokens x "
            f"{args.capacity_token_delay * 1000:g} ms"
        )
        print(table(capacity, capacity=True))
    if not args.no_json:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"server-{stamp}.json"
        out.write_text(json.dumps({
            "timestamp": stamp, "label": args.label, "command": " ".join(sys.argv),
            "machine": machine(), "load_before": load_before, "load_after": load_after,
            "args": vars(args), "official": info.get("official"),
            "throughput": throughput, "capacity": capacity}, indent=2, default=str))  # fmt: skip
        print(f"json: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
