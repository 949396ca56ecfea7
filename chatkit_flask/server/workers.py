"""Refuse a gunicorn worker class that cannot hold a streamed reply.

A reply streams for as long as the model talks, often past gunicorn's ``timeout`` (30 s). The
default ``sync`` worker serves one request at a time and is killed when a request outlasts that
timeout (``WORKER TIMEOUT``), cutting the reply mid-stream; ``gthread`` is not (its timeout only
watches the worker's own loop). A host app started with plain ``gunicorn 'site:create_app()'``
gets the sync worker, so server mode checks at start-up, while the app is being loaded.

gunicorn offers an app no API to see its settings; the loader that builds the app (a worker,
or the arbiter with ``--preload``) is on the call stack, and its ``cfg`` is gunicorn's resolved
configuration. Outside gunicorn nothing is found and nothing is checked.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ..settings import ConfigError

__all__ = ["GUNICORN_FIX", "check_gunicorn_worker"]

log = logging.getLogger("chatkit_flask")

GUNICORN_FIX = "gunicorn --worker-class gthread --threads 32 (or -c config/gunicorn.conf.py)"


def _gunicorn_config() -> Any | None:
    """gunicorn's ``Config`` of the process loading this app, or None when not under gunicorn."""
    if "gunicorn.config" not in sys.modules:
        return None
    from gunicorn.config import Config

    frame = sys._getframe(1)
    while frame is not None:
        config = getattr(frame.f_locals.get("self"), "cfg", None)
        if isinstance(config, Config):
            return config
        frame = frame.f_back
    return None


def check_gunicorn_worker() -> None:
    """Raise ``ConfigError`` under gunicorn's sync worker; warn under a worker class other than
    server mode's own or gthread (untested with the asyncio bridge). Silent outside gunicorn."""
    config = _gunicorn_config()
    if config is None:
        return
    from gunicorn.workers.gthread import ThreadWorker
    from gunicorn.workers.sync import SyncWorker

    from .asgi_worker import ChatKitWorker

    worker = config.worker_class
    if issubclass(worker, (ThreadWorker, ChatKitWorker)):
        return
    if issubclass(worker, SyncWorker):
        raise ConfigError(
            "worker_class",
            f"server mode cannot run under gunicorn's sync worker: it serves one request at a "
            f"time and kills a reply that streams longer than its timeout ({config.timeout} s) "
            f"mid-stream. Run {GUNICORN_FIX}",
        )
    log.warning(
        "chatkit_flask: server mode is tested under gunicorn's gthread worker, not %s; "
        "if replies stall or are cut, run %s",
        config.worker_class_str,
        GUNICORN_FIX,
    )
