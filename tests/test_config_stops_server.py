"""A bad setting stops the whole gunicorn server within seconds, naming the key, whether started
as the container and bin/serve do (`gunicorn -c config/gunicorn.conf.py wsgi:app`) or as plain
`gunicorn wsgi:app`; workers are not restarted in a loop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatkit_flask.settings import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).parent / "gunicorn")
REQUIRED = {
    "OPENAI_API_KEY": "test-key-not-used",
    "SECRET_KEY": "test-secret-key-0123456789-0123456789",
    "CHATKIT_WORKFLOW_ID": "wf_1",
}
COMMANDS = {
    "config": [GUNICORN, "-c", "config/gunicorn.conf.py", "wsgi:app"],
    "plain": [GUNICORN, "-b", "127.0.0.1:0", "-w", "2", "wsgi:app"],
}
CASES = {
    "typo": (
        {**REQUIRED, "CHATKIT_RATELIMIT_PER_USER": "10 per minite"},
        "CHATKIT_RATELIMIT_PER_USER",
    ),
    "no-dotenv": ({}, "OPENAI_API_KEY"),
    # Server mode (the default) under the sync worker, which would kill long replies: plain
    # gunicorn's default, or GUNICORN_WORKER_CLASS=sync with our config (with one thread: with
    # more, gunicorn itself runs gthread).
    "sync-worker": (
        {"OPENAI_API_KEY": "test-key-not-used", "SECRET_KEY": REQUIRED["SECRET_KEY"],
         "GUNICORN_WORKER_CLASS": "sync", "GUNICORN_THREADS": "1"},
        "worker_class",
    ),
}

pytestmark = pytest.mark.slow


def run_gunicorn(command: list[str], settings: dict[str, str], tmp_path: Path) -> tuple:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    clean = {
        k: v for k, v in os.environ.items() if k not in OPTIONS and not k.startswith("GUNICORN")
    }
    env = {
        **clean,
        "CHATKIT_ENV_FILE": str(empty),  # never the developer's .env
        "GUNICORN_BIND": "127.0.0.1:0",
        "GUNICORN_WORKERS": "2",
        "GUNICORN_THREADS": "2",
        "RATELIMIT_STORAGE_URI": "memory://",
        **settings,
    }
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"gunicorn still running after 30 s: {exc.stderr!r}")
    return result, time.monotonic() - started


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("how", sorted(COMMANDS))
def test_a_bad_setting_stops_gunicorn_naming_the_key(how: str, case: str, tmp_path: Path) -> None:
    settings, key = CASES[case]
    result, seconds = run_gunicorn(COMMANDS[how], settings, tmp_path)
    assert result.returncode != 0
    assert seconds < 10, seconds
    assert f"configuration error: {key}" in result.stderr, result.stderr
    boots = result.stderr.count("Booting worker")
    # With our config no worker is forked at all; plain gunicorn boots each of its 2 workers
    # at most once (before the fix: hundreds of boots until the timeout).
    assert boots == 0 if how == "config" else boots <= 2, result.stderr
    print(f"{how}/{case}: exit {result.returncode} after {seconds:.2f} s, {boots} worker boot(s)")
