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
