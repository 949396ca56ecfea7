"""Summed metrics under a gunicorn started without ``config/gunicorn.conf.py``.

``gunicorn -w 3 wsgi:app`` runs three processes, each with its own counters; without
``PROMETHEUS_MULTIPROC_DIR`` ``/metrics`` shows whichever worker answers, and nothing says so.
Our gunicorn config prepares that directory in the master (see its ``on_starting``); without it,
the service's app factory calls :func:`adopt_gunicorn_metrics_dir` in each worker, before
prometheus-client is imported, and the workers of one gunicorn agree on one directory: named
after their master's pid, and emptied by the first worker of a new master (a marker file holds
the master's start time, so a directory left by an earlier gunicorn with the same pid, such as
pid 1 in a container, is never added in). Dead workers' live gauges are dropped at scrape time
(:func:`forget_dead_workers`), the job the config's ``child_exit`` hook does otherwise, and
the directories of gunicorns that have exited are removed when the next one starts.

Nothing here imports prometheus-client: importing it decides the mode.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["ADOPTED_ENV", "adopt_gunicorn_metrics_dir", "forget_dead_workers", "under_gunicorn"]

ENV = "PROMETHEUS_MULTIPROC_DIR"
ADOPTED_ENV = "CHATKIT_ADOPTED_METRICS_DIR"  # set when the directory is this module's
_MARKER = "master"
_LIVE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def under_gunicorn() -> bool:
    """True in a gunicorn master or worker (its arbiter sets ``SERVER_SOFTWARE``)."""
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/")


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc cannot tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def _in_worker() -> bool:
    """True when called while a gunicorn worker loads the app (a worker's frames are on the
    stack); False in the master (``--preload``)."""
    frame = sys._getframe()
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith("gunicorn.workers."):
            return True
        frame = frame.f_back
    return False


def adopt_gunicorn_metrics_dir() -> str | None:
    """In a gunicorn worker without ``PROMETHEUS_MULTIPROC_DIR``: set it to this gunicorn's
    shared directory and return it. None when there is nothing to do (not gunicorn, already
    set, prometheus-client already imported, or no private directory could be made)."""
    if os.environ.get(ENV, "").strip() or not under_gunicorn():
        return None
    if "prometheus_client" in sys.modules:  # the mode is chosen: too late
        return None
    master = os.getppid() if _in_worker() else os.getpid()  # --preload: the master loads us
    directory = Path(tempfile.gettempdir()) / f"chatkit-prometheus-{os.getuid()}-{master}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        if directory.stat().st_uid != os.getuid() or directory.is_symlink():
            return None  # someone else's: never write metrics where they could be read
        with open(directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker of a new master empties it
            marker = directory / _MARKER
            started = f"{master} {_start_time(master)}"
            if not marker.exists() or marker.read_text() != started:
                for old in directory.glob("*.db"):
                    old.unlink()
                marker.write_text(started)
    except OSError:
        return None
    os.environ[ENV] = str(directory)
    os.environ[ADOPTED_ENV] = str(directory)
    _remove_dead_masters(directory.parent, os.getuid())
    return str(directory)


def _remove_dead_masters(parent: Path, uid: int) -> None:
    """Delete the directories of earlier gunicorns of this user that are gone (nothing else
    removes them: a worker cannot know when its master exits)."""
    for old in parent.glob(f"chatkit-prometheus-{uid}-*"):
        pid = old.name.rpartition("-")[2]
        if not pid.isdigit() or not (old / _MARKER).is_file() or old.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:  # alive
            continue


def forget_dead_workers(mark_process_dead: object) -> None:
    """Drop the live gauges of workers that are gone (``mark_process_dead`` is
    prometheus-client's, passed in so this module never imports it)."""
    directory = os.environ.get(ADOPTED_ENV)
    if not directory or directory != os.environ.get(ENV):
        return
    pids = {int(m.group(1)) for p in Path(directory).glob("gauge_live*.db")
            if (m := _LIVE_FILE.fullmatch(p.name))}  # fmt: skip
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, directory)  # type: ignore[operator]
        except PermissionError:  # alive, another user's
            continue
