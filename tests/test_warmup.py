"""The warm-up gunicorn's master runs before forking: it builds what a worker's first replies
would otherwise build and imports what a worker imports (so that the workers share it), leaves no
thread or socket behind to fork, and after a SIGHUP the app's modules are its current code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys, threading
from openai.types.responses import ResponseCompletedEvent, ResponseTextDeltaEvent
from chatkit.types import ThreadCreatedEvent, ThreadItemUpdatedEvent, ThreadUpdatedEvent
lazy = (ResponseTextDeltaEvent, ResponseCompletedEvent, ThreadCreatedEvent,
        ThreadItemUpdatedEvent, ThreadUpdatedEvent)
assert not any(model.__pydantic_complete__ for model in lazy)  # built lazily, on first use
from chatkit_flask.server.warmup import warm_sdks
assert warm_sdks()
assert all(model.__pydantic_complete__ for model in lazy)
# the app's modules and the server's are imported; the metrics, the SQL store and the hosted
# mode's HTTP client are not
for name in ("chatkit_flask.service", "chatkit_flask.server.views", "flask_limiter", "uvloop"):
    assert name in sys.modules, name
for name in ("prometheus_client", "chatkit_flask.metrics", "sqlalchemy", "requests"):
    assert name not in sys.modules, name
assert threading.enumerate() == [threading.main_thread()], threading.enumerate()
import os
def target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the directory listing's own descriptor
        return ""
assert not [fd for fd in os.listdir("/proc/self/fd") if target(fd).startswith("socket:")]
print("warm")
"""


def test_warm_up_builds_the_stream_models_and_leaves_nothing_running() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "warm"


def test_the_master_loads_the_worker_class_without_the_app() -> None:
    """gunicorn's master imports the worker class at start-up; Flask, prometheus-client and the
    app's settings must wait for the workers (the metrics directory is made before them)."""
    probe = (
        "import sys, chatkit_flask.server.asgi_worker\n"
        "loaded = [m for m in ('flask', 'prometheus_client', 'chatkit_flask.settings') "
        "if m in sys.modules]\n"
        "print(loaded)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


RELOAD_PROBE = """
import sys
from pathlib import Path
from chatkit_flask.server import warmup
assert warmup.warm_sdks()
import chatkit_flask
assert chatkit_flask.__file__.startswith(str(Path.cwd())), chatkit_flask.__file__
from chatkit_flask.server import health
old_health, old_export = health, chatkit_flask.ChatKit
assert not hasattr(health, "EDITED")
path = Path(health.__file__)
path.write_text(path.read_text() + "\\nEDITED = True\\n")
assert warmup.reimport_app_modules()
from chatkit_flask.server import health
from chatkit_flask import ChatKit
from chatkit_flask.extension import ChatKit as fresh
assert health is not old_health and health.EDITED, "the edited module was not imported again"
assert ChatKit is fresh and ChatKit is not old_export, "a lazy export kept the old class"
print("reloaded")
"""


def test_after_a_sighup_the_master_holds_the_apps_current_code(tmp_path: Path) -> None:
    """gunicorn calls on_reload on SIGHUP: the app's modules the warm-up imported are imported
    again, so the workers it then forks run what is on disk now (here a copy of the package,
    edited after the warm-up)."""
    shutil.copytree(
        ROOT / "chatkit_flask",
        tmp_path / "chatkit_flask",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_PROBE],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reloaded"
