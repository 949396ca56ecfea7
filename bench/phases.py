"""Where a reply's time went, from ours' message log lines (``bench/server.py --keep`` keeps
them: ``<tmp>/ours-<port>.log``).

Each streamed reply's line carries, in ms from the request's start in Flask (see
docs/operations.md, "The message log line"): ``admitted_ms`` (identity and limits done),
``ttfe_ms`` (first frame out), ``model_called_ms`` (history read, model request made),
``model_delta_ms`` (the model's first delta reached the worker), ``first_answer_ms``, and
``queued_ms`` (the wait for a pool thread before that start). This prints their p50 / p90 per
worker over the last ``--last`` lines, how the visitors spread over the workers, and how
bunched the requests arrived (other requests started on the same worker in the 50 ms before
each one: about 0.3 if they came at random at 7 a second).

    .venv/bin/python bench/phases.py /tmp/chatkit-bench-server-XXXX/ours-*.log --last 250
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import re
import statistics
from collections import defaultdict

PHASES = ("queued_ms", "admitted_ms", "ttfe_ms", "model_called_ms", "model_delta_ms",
          "first_answer_ms")  # fmt: skip
FIELD = re.compile(r"(\w+)=(\S+)")
PID = re.compile(r"\[(\d+)\]")


def read(paths: list[str]) -> list[dict[str, str]]:
    rows = []
    for path in paths:
        with open(path) as lines:
            for line in lines:
                if "chatkit_flask.message" not in line or "first_answer_ms=" not in line:
                    continue
                fields = dict(FIELD.findall(line))
                fields["pid"] = PID.search(line).group(1)  # type: ignore[union-attr]
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                fields["start"] = str(stamp.timestamp() - float(fields["duration_ms"]) / 1000)
                rows.append(fields)
    return rows


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--last", type=int, default=250, help="lines (the measured window)")
    args = parser.parse_args()
    rows = read(args.logs)[-args.last :]
    by_pid: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_pid[row["pid"]].append(row)
    print(f"{len(rows)} replies; p50 / p90 ms from the request's start in Flask")
    print("| worker | visitors | replies | " + " | ".join(p[:-3] for p in PHASES) + " |")
    print("|---" * (len(PHASES) + 3) + "|")
    for pid, mine in sorted(by_pid.items()):
        cells = []
        for phase in PHASES:
            values = [float(r[phase]) for r in mine if phase in r]
            cells.append(f"{pct(values, 0.5):.1f} / {pct(values, 0.9):.1f}" if values else "-")
        visitors = len({r.get("visitor") for r in mine})
        print(f"| {pid} | {visitors} | {len(mine)} | " + " | ".join(cells) + " |")
    bunched = []
    for mine in by_pid.values():
        starts = sorted(float(r["start"]) for r in mine)
        for s in starts:
            bunched.append(bisect.bisect_left(starts, s) - bisect.bisect_left(starts, s - 0.05))
    print(f"other requests started on the same worker in the 50 ms before each: mean "
          f"{statistics.mean(bunched):.2f}, p90 {pct(bunched, 0.9):.0f}")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
