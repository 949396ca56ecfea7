"""Smoke test of the benchmark: ``bench/run.py`` runs end to end and reports a sane table."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatkit_flask.testing.redis_server import RedisServerMissing

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bench_run_smoke() -> None:
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    if missing:  # the bench starts its own redis-server and reads it with redis-cli
        message = str(RedisServerMissing(missing[0]))
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--duration",
            "2",
            "--warmup",
            "1",
            "--connections",
            "8",
            "--variant",
            "returning",
            "--no-json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| target")
    }
    assert set(rows) == {"ceiling (fake upstream)", "service returning"}, result.stdout
    for name, cells in rows.items():
        rps, errors = float(cells[0]), cells[4]
        assert rps > 0, (name, result.stdout)
        assert errors == "0", (name, result.stdout)
    service = rows["service returning"]
    assert float(service[5]) > 0  # CPU ms per request
    assert float(service[6]) > 0  # peak RSS per worker
    assert re.fullmatch(r"\d+(\.\d+)?", service[10])  # Redis round trips per mint


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.mysql
@pytest.mark.timeout(150)
def test_bench_stores_smoke() -> None:
    """bench/stores.py measures every store, PostgreSQL and MariaDB included, on servers it
    starts."""
    from chatkit_flask.testing.mariadb_server import MariaDBServerMissing, find_mariadb_bins
    from chatkit_flask.testing.postgres_server import PostgresServerMissing, find_postgres_bin

    missing = [tool for tool in ("redis-server",) if shutil.which(tool) is None]
    if missing or find_postgres_bin() is None or find_mariadb_bins() is None:
        message = str(
            RedisServerMissing(missing[0]) if missing
            else PostgresServerMissing() if find_postgres_bin() is None
            else MariaDBServerMissing()
        )  # fmt: skip
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [sys.executable, "bench/stores.py", "--messages", "40", "--visitors", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=140,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| store")
    }
    assert set(rows) == {"sqlite", "aiosqlite", "redis", "postgres", "mariadb"}, result.stdout
    for name, cells in rows.items():
        assert float(cells[0]) > 0 and float(cells[1]) > 0, (name, result.stdout)
        assert cells[3] == "40", (name, result.stdout)


def _markdown_rows(text: str, first_cell: str) -> list[list[str]]:
    """The rows of the markdown table whose header starts with ``first_cell``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.split("|")[1:-1]])
    return rows


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_server_bench_smoke() -> None:
    """bench/server.py (ours only: no official sample in CI) measures throughput, idle memory and
    capacity end to end, and every message it sent was answered in full."""
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    if missing:
        message = str(RedisServerMissing(missing[0]))
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [
            sys.executable, "bench/server.py", "--no-official", "--no-json", "--quiet-wait", "0",
            "--visitors", "3", "--think", "0.2", "--warmup", "1", "--duration", "2",
            "--capacity", "--cap-levels", "2", "--cap-words", "12", "--cap-token-delay", "0.05",
            "--cap-window", "2", "--cap-samples", "5", "--keep",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    rows = {row[1]: row for row in _markdown_rows(out, "visitors")}
    assert set(rows) == {"model (fake, direct)", "ours"}, out
    ours = rows["ours"]
    assert float(ours[2]) > 0, out  # msg/s
    assert float(ours[3]) > 0, out  # server CPU ms per message
    added_p50, added_p99 = (float(x) for x in ours[5].split(" / "))
    assert added_p50 <= added_p99, out
    peak_rss, peak_pss = (float(x) for x in ours[6].split(" / "))
    assert 0 < peak_pss <= peak_rss, out
    assert ours[7] == "0" and rows["model (fake, direct)"][7] == "0", out  # errors
    (memory,) = _markdown_rows(out, "target")
    assert memory[0] == "ours" and int(memory[1]) >= 2, out  # gunicorn's master and workers
    assert float(memory[2]) > 0, out  # idle PSS
    assert memory[4] in {"0", "2"}, out  # capacity: the one level passed or not, but measured
    (level,) = _markdown_rows(out.split("capacity levels", 1)[1], "target")
    assert level[1] == "2" and int(level[5]) > 0, out  # open streams, samples

    # Where each reply's time went, from ours' log lines the run kept (bench/phases.py).
    kept = re.search(r"logs: (\S+)", out + result.stderr)
    assert kept, out + result.stderr
    try:
        logs = sorted(Path(kept.group(1)).glob("ours-*.log"))
        phases = subprocess.run([sys.executable, "bench/phases.py", *map(str, logs)], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        assert phases.returncode == 0, phases.stderr
        workers = _markdown_rows(phases.stdout, "worker")
        assert workers and sum(int(row[2]) for row in workers) > 0, phases.stdout
        for row in workers:  # every phase measured, in order of a reply's life
            admitted, ttfe, called, delta = (float(row[i].split(" / ")[0]) for i in (4, 5, 6, 7))
            assert 0 < admitted <= ttfe and called <= delta, phases.stdout
    finally:
        shutil.rmtree(kept.group(1), ignore_errors=True)
