"""bench/server.py's tables (markdown, ready for docs/benchmark.md) and the ratios ours/official."""

from __future__ import annotations

from typing import Any


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _errors(errors: dict[str, int] | int) -> str:
    if isinstance(errors, int):
        return str(errors)
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def throughput_table(rows: list[dict[str, Any]]) -> str:
    """The issue's table: per level, the model's own row, then each server's."""
    head = [
        "visitors",
        "target",
        "msg/s",
        "server CPU ms/msg",
        "TTFD p50 / p99 ms",
        "added TTFD p50 / p99 ms",
        "peak RSS / PSS MB",
        "errors",
        "driver / other cores",
    ]
    out = []
    for r in rows:
        model = r["target"] == "model"
        out.append(
            [
                str(r["visitors"]),
                "model (fake, direct)" if model else r["target"],
                f"{r['msg_s']:.1f}",
                "-" if model else f"{r['cpu_ms_msg']:.1f}",
                f"{r['ttfd_p50_ms']:.0f} / {r['ttfd_p99_ms']:.0f}",
                "-" if model else f"{r['added_p50_ms']:+.0f} / {r['added_p99_ms']:+.0f}",
                "-" if model else f"{r['peak_rss_mb']:.0f} / {r['peak_pss_mb']:.0f}",
                _errors(r["errors"]),
                f"{r['driver_cores']:.2f} / {r['other_cores']:.2f}",
            ]
        )
    return _table(head, out)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """One line per level: ours / official for CPU per message and added time to first delta."""
    lines = []
    for n in sorted({r["visitors"] for r in rows}):
        by = {r["target"]: r for r in rows if r["visitors"] == n}
        ours, theirs = by.get("ours"), by.get("official")
        if not ours or not theirs:
            continue

        def ratio(key: str, ours: dict = ours, theirs: dict = theirs) -> str:
            return f"{ours[key] / theirs[key]:.2f}" if theirs[key] > 0 else "n/a"

        lines.append(
            f"ours / official at {n} visitors: msg/s {ratio('msg_s')}, CPU per message "
            f"{ratio('cpu_ms_msg')}, added TTFD p50 {ratio('added_p50_ms')}, p99 "
            f"{ratio('added_p99_ms')}, peak PSS {ratio('peak_pss_mb')}"
        )
    return lines


def memory_table(memory: dict[str, dict[str, Any]], capacity: list[dict[str, Any]]) -> str:
    """Idle memory of each server and, when measured, its open-stream capacity."""
    caps = {c["target"]: c for c in capacity}
    head = [
        "target",
        "processes",
        "idle PSS MB",
        "idle RSS MB",
        "capacity: open streams",
        "first failing level",
    ]
    out = []
    for name, m in memory.items():
        cap = caps.get(name)
        out.append(
            [
                name,
                str(m["processes"]),
                f"{m['idle_pss_mb']:.0f}",
                f"{m['idle_rss_mb']:.0f}",
                str(cap["capacity"]) if cap else "-",
                str(cap["first_fail"]) if cap and cap["first_fail"] else "-",
            ]
        )
    return _table(head, out)


def capacity_table(capacity: list[dict[str, Any]]) -> str:
    head = [
        "target",
        "open streams",
        "TTFD p50 / p99 ms",
        "model's p99 ms",
        "added p99 ms",
        "samples",
        "errors",
        "server cores",
        "peak RSS / PSS MB",
        "driver / other cores",
        "verdict",
    ]
    out = []
    for c in capacity:
        for r in c["levels"]:
            out.append(
                [
                    c["target"],
                    str(r["n"]),
                    f"{r['ttfd_p50_ms']:.0f} / {r['ttfd_p99_ms']:.0f}",
                    f"{r['floor_p99_ms']:.0f}",
                    f"{r['added_p99_ms']:+.0f}",
                    str(r["samples"]),
                    str(r["errors"]),
                    f"{r['server_cpu_s'] / r['seconds']:.2f}",
                    f"{r['peak_rss_mb']:.0f} / {r['peak_pss_mb']:.0f}",
                    f"{r['driver_cores']:.2f} / {r['other_cores']:.2f}",
                    "ok" if r["ok"] else "FAIL",
                ]
            )
    return _table(head, out)
