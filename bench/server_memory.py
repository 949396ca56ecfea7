"""Where an idle instance's memory is: ours started as ``bench/server.py`` starts it, per process.

    .venv/bin/python bench/server_memory.py [--env KEY=VALUE] [--ours-cmd CMD]

Before any request and again after ``bench/server.py``'s warm-up traffic (a probe, then 16
visitors for 3 s), for gunicorn's master and each worker: PSS (``/proc/<pid>/smaps_rollup``,
what ``bench/server.py`` sums as idle PSS), split into anonymous and file-backed, and threads.
As root, also each worker's resident pages against the master's (``/proc/<pid>/pagemap``):
**shared** (the master's own page: counted once for all), **copied** (the master has a page at
that address and the worker its own copy: written after the fork, by reference counts or
otherwise), **own** (only the worker has a page there: what it allocated itself). File PSS
moves with other processes mapping the same files (another checkout's server on the same venv
halves it); the anonymous part is this instance's own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import tempfile
from pathlib import Path

from redis_tools import bench_redis
from server_measure import settle, warm_up
from servers import Served, fake_model, our_server

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024


def _rollup(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return {line.split()[0].rstrip(":"): int(line.split()[1]) * 1024 for line in lines}


def _pages(pid: int) -> dict[int, int]:
    """Resident pages of ``pid``'s anonymous mappings: address -> physical frame (0 for every
    page unless root)."""
    pages: dict[int, int] = {}
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[5].startswith("/"):  # file-backed
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(low // PAGE * 8)
            data = pagemap.read((high - low) // PAGE * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
                if entry >> 63:  # present
                    pages[low + i * PAGE] = entry & ((1 << 55) - 1)
    return pages


def report(server: Served, label: str) -> None:
    master = server.proc.pid
    pids = sorted(server.pids(), key=lambda pid: pid != master)
    total = 0
    print(f"\n{label}")
    print("| process | PSS MB | anon | file | threads | anon pages shared / copied / own MB |")
    print("|---|---|---|---|---|---|")
    ours = _pages(master) if os.geteuid() == 0 else None
    for pid in pids:
        rollup = _rollup(pid)
        total += rollup["Pss"]
        split = "-"
        if pid != master and ours is not None:
            counts = [0, 0, 0]
            for address, frame in _pages(pid).items():
                theirs = ours.get(address)
                counts[0 if theirs == frame else 1 if theirs is not None else 2] += 1
            split = " / ".join(f"{n * PAGE / MB:.1f}" for n in counts)
        threads = len(os.listdir(f"/proc/{pid}/task"))
        print(
            f"| {'master' if pid == master else 'worker'} {pid} | {rollup['Pss'] / MB:.1f} | "
            f"{rollup.get('Pss_Anon', 0) / MB:.1f} | {rollup.get('Pss_File', 0) / MB:.1f} | "
            f"{threads} | {split} |"
        )
    print(f"| all | **{total / MB:.1f}** | | | | |")


async def run(args: argparse.Namespace, workdir: Path, redis: str) -> None:
    fake = fake_model(workdir, 0.005)
    try:
        server = our_server(fake, workdir, redis, args.ours_cmd, args.env)
        try:
            await settle(server)
            report(server, "idle, before any request")
            await warm_up(server, args.text)
            await asyncio.sleep(1)
            report(server, "idle, after the warm-up traffic")
        finally:
            server.stop()
    finally:
        fake.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--ours-cmd", default=os.environ.get("CHATKIT_BENCH_OURS_CMD"))
    p.add_argument("--text", default="hello, I need help with my trip")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("not root: no shared / copied / own split (pagemap hides frames)", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="chatkit-bench-memory-"))
    redis = bench_redis(None)
    try:
        asyncio.run(run(args, workdir, f"redis://127.0.0.1:{redis.port}"))
    finally:
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
