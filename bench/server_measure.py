"""bench/server.py's measurements: a load level's figures (throughput with think time), a
capacity search (streams held open), a server's warm-up and idle memory, and the window that
reads CPU and memory around each of them."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

from chat_load import Caller, ModelCaller, Result, Visitor, closed_loop, now, percentile
from procs import machine_jiffies
from servers import Served

__all__ = ["capacity", "idle_memory", "log", "throughput", "warm_up"]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Window:
    """CPU of the server, the model and this driver, and the machine's, between two marks;
    RSS and PSS of the server sampled in between (peaks)."""

    def __init__(self, server: Served | None, fake: Served) -> None:
        self.server, self.fake = server, fake
        self.pids = server.pids() if server else []
        self.peak_rss = self.peak_pss = 0

    def _mark(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "t": now(),
            "server": self.server.cpu() if self.server else 0.0,
            "fake": self.fake.cpu(),
            "driver": usage.ru_utime + usage.ru_stime,
            "machine": machine_jiffies(),
        }

    async def sample(self) -> None:
        while self.server:
            self.peak_rss = max(self.peak_rss, self.server.rss_kb())
            self.peak_pss = max(self.peak_pss, self.server.pss_kb())
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self.a = self._mark()
        self.sampler = asyncio.create_task(self.sample())

    async def end(self) -> dict[str, Any]:
        b = self._mark()
        self.sampler.cancel()
        await asyncio.gather(self.sampler, return_exceptions=True)
        a, wall = self.a, b["t"] - self.a["t"]
        busy, total = (b["machine"][i] - a["machine"][i] for i in (0, 1))
        machine_cores = (os.cpu_count() or 1) * busy / max(1, total)
        known = sum(b[k] - a[k] for k in ("server", "fake", "driver")) / wall
        return {
            "seconds": wall,
            "server_cpu_s": b["server"] - a["server"],
            "driver_cores": (b["driver"] - a["driver"]) / wall,
            "other_cores": max(0.0, machine_cores - known),
            "peak_rss_mb": self.peak_rss / 1024,
            "peak_pss_mb": self.peak_pss / 1024,
        }


def summary(results: list[Result], window: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttfd = [r.first_delta_s for r in ok if r.first_delta_s is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[f"{r.kind}:{r.error}"] = errors.get(f"{r.kind}:{r.error}", 0) + 1
    return {
        **window,
        "messages": len(ok),
        "msg_s": len(ok) / window["seconds"],
        "cpu_ms_msg": 1000 * window["server_cpu_s"] / max(1, len(ok)),
        "ttfd_p50_ms": 1000 * percentile(ttfd, 50),
        "ttfd_p99_ms": 1000 * percentile(ttfd, 99),
        "errors": errors,
    }


async def throughput(
    make: Callable[[], Caller],
    n: int,
    server: Served | None,
    fake: Served,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """``n`` callers in a closed loop with think time: warm-up, then the measured window."""
    callers = [make() for _ in range(n)]
    await closed_loop(callers, args.warmup, args.think, lambda r: None)
    results: list[Result] = []
    window = Window(server, fake)
    window.start()
    await closed_loop(callers, args.duration, args.think, results.append)
    figures = summary(results, await window.end())
    await asyncio.gather(*(c.close() for c in callers))
    return figures


async def hold(
    make: Callable[[], Caller],
    n: int,
    ramp: float,
    args: argparse.Namespace,
    server: Served | None,
    fake: Served,
) -> dict[str, Any]:
    """``n`` streams kept open; the time to first delta of those started in the window."""
    callers = [make() for _ in range(n)]
    t0 = now()
    # Long enough for --cap-samples new streams: a p99 of fewer than 100 is the single worst.
    window = max(args.cap_window, args.cap_samples * ramp / n)
    lo, hi = t0 + ramp, t0 + ramp + window
    counted: list[Result] = []
    stopping = False

    async def keep_open(i: int, caller: Caller) -> None:
        await asyncio.sleep(i * ramp / n)
        while not stopping:
            r = Result("stream")
            if lo <= now() < hi:
                counted.append(r)
            await caller.message(r)
            if r.first_delta_s is None:
                await asyncio.sleep(0.2)  # refused: retry, as a visitor would, but not in a spin

    tasks = [asyncio.create_task(keep_open(i, c)) for i, c in enumerate(callers)]
    await asyncio.sleep(lo - now())
    window = Window(server, fake)
    window.start()
    await asyncio.sleep(hi - now())
    figures = await window.end()
    stopping = True
    grace = now() + 30
    while now() < grace and any(r.first_delta_s is None and not r.error for r in counted):
        await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in callers))
    ttfd = [r.first_delta_s for r in counted if r.first_delta_s is not None]
    failed = [r for r in counted if r.first_delta_s is None]
    return {
        **figures,
        "n": n,
        "samples": len(ttfd),
        "errors": len(failed),
        "ttfd_p50_ms": 1000 * percentile(ttfd, 50),
        "ttfd_p99_ms": 1000 * percentile(ttfd, 99),
    }


async def settle(server: Served, limit: float = 20.0) -> None:
    """Wait until the server is idle again (cut streams cleaned up)."""
    end = now() + limit
    while now() < end:
        before = server.cpu()
        await asyncio.sleep(1.0)
        if server.cpu() - before < 0.03:
            return


async def capacity(
    server: Served,
    fake: Served,
    args: argparse.Namespace,
    ramp: float,
    floors: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    """The largest N that passes (see the module's docstring), with every level's figures."""
    levels: list[dict[str, Any]] = []

    def caller() -> Caller:
        return Visitor(
            server.port,
            server.path,
            args.cap_text,
            own_address=True,
            messages_per_thread=args.messages_per_thread,
        )

    async def passes(n: int) -> bool:
        if n not in floors:
            floors[n] = await hold(
                lambda: ModelCaller(fake.port, args.cap_text), n, ramp, args, None, fake
            )
            await asyncio.sleep(1)
        row = await hold(caller, n, ramp, args, server, fake)
        row["floor_p99_ms"] = floors[n]["ttfd_p99_ms"]
        row["added_p99_ms"] = row["ttfd_p99_ms"] - row["floor_p99_ms"]
        row["ok"] = (
            row["samples"] > 0
            and row["added_p99_ms"] <= args.cap_margin_ms
            and row["errors"] <= 0.01 * (row["samples"] + row["errors"])
        )
        levels.append(row)
        log(
            f"  capacity {server.name} {n} streams: p99 {row['ttfd_p99_ms']:.0f} ms (model "
            f"{row['floor_p99_ms']:.0f}), {row['samples']} samples, {row['errors']} errors, "
            f"server {row['server_cpu_s'] / row['seconds']:.2f} cores, driver "
            f"{row['driver_cores']:.2f}: {'ok' if row['ok'] else 'FAIL'}"
        )
        await settle(server)
        return row["ok"]

    good, bad = 0, None
    if args.cap_levels:
        for n in args.cap_levels:
            if await passes(n):
                good = max(good, n)
            else:
                bad = n if bad is None else min(bad, n)
    else:
        n = args.cap_start
        while n <= args.cap_max:
            if not await passes(n):
                bad = n
                break
            good, n = n, n * 2
        # The start itself failed: halve down to a level that holds (8 at the least), then
        # bisect between it and the failure as usual.
        n = (bad or 0) // 2
        while not good and n >= 8:
            if await passes(n):
                good = n
            else:
                bad, n = n, n // 2
        while bad is not None and good and bad - good > max(args.cap_resolution, good // 8):
            mid = (good + bad) // 2
            if await passes(mid):
                good = mid
            else:
                bad = mid
    return {
        "target": server.name,
        "capacity": good,
        "first_fail": bad,
        "levels": sorted(levels, key=lambda r: r["n"]),
    }


async def probe(server: Served, text: str) -> None:
    """One visitor creates a thread and adds a message: the server answers as the bench expects."""
    visitor = Visitor(server.port, server.path, text, own_address=True)
    try:
        for _ in range(2):
            r = await visitor.message()
            if not r.ok:
                tail = server.log.read_text(errors="replace")[-1500:]
                raise SystemExit(f"{server.name}: {r.kind} failed ({r.error}); log:\n{tail}")
    finally:
        await visitor.close()


async def warm_up(server: Served, text: str) -> None:
    """A probe, then 16 visitors for 3 s: every worker has imported and built what it builds on
    first use (~100 ms each), as a server that has served for a while has."""
    await probe(server, text)
    callers = [Visitor(server.port, server.path, text, own_address=True) for _ in range(16)]
    await closed_loop(callers, 3.0, 0.1, lambda r: None)
    await asyncio.gather(*(c.close() for c in callers))
    await settle(server)


async def idle_memory(server: Served, text: str) -> dict[str, Any]:
    """PSS and RSS of all the server's processes, idle after the warm-up."""
    await warm_up(server, text)
    await asyncio.sleep(1)
    return {
        "idle_pss_mb": server.pss_kb() / 1024,
        "idle_rss_mb": server.rss_kb() / 1024,
        "processes": len(server.pids()),
    }
