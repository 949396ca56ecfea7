"""Smoke test of ``bench/titles.py``: both services answer, titles run only where they are on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatkit_flask.testing.redis_server import RedisServerMissing

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_titles_smoke() -> None:
    if shutil.which("redis-server") is None:  # the bench starts its own
        if os.environ.get("CI"):
            pytest.fail(str(RedisServerMissing("redis-server")))
        pytest.skip(str(RedisServerMissing("redis-server")))
    result = subprocess.run(
        [sys.executable, "bench/titles.py", "--visitors", "2", "--duration", "2", "--rounds", "1",
         "--workers", "1"],  # one worker each: quicker to start on a busy machine
        cwd=ROOT, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if line.startswith("| titles")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    assert set(rows) == {"titles off", "titles on"}, result.stdout
    for name, (visitors, messages, p50, *_, errors) in rows.items():
        assert visitors == "2" and int(messages) > 0 and float(p50) > 0, (name, result.stdout)
        assert errors == "0", (name, result.stdout)
    assert rows["titles off"][-2].startswith("0 of ")
    made, _, total = rows["titles on"][-2].partition(" of ")
    assert int(made) == int(total) > 0, result.stdout
