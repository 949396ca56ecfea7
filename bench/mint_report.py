"""The mint bench's report: one table (service rows against the ceiling), a line of detail per
row, and the JSON written to bench/results/."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from procs import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


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


def print_report(
    args: argparse.Namespace, argv: list[str] | None, settings: dict[str, Any],
    results: list[dict[str, Any]], stamp: str,
) -> None:  # fmt: skip
    """Print the table and the detail lines; unless ``--no-json``, write the figures."""
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
