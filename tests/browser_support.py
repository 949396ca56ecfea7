"""Shared by the real-browser tests: Debian's Chromium driven by Playwright, CDN blocked."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from werkzeug.serving import make_server

CHROMIUM = os.environ.get("CHATKIT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CDN_PATTERN = "https://cdn.platform.openai.com/**"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install it: apt-get install -y chromium; pip playwright)")
    pytest.skip(reason)


def launch_browser() -> Iterator[Any]:
    """Yield a headless Chromium (skipped, or failed under CI, when it is not installed)."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"Chromium not installed at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright for Python is not installed (pip install playwright)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def wsgi_servers() -> Iterator[Callable[..., str]]:
    """For a fixture: ``serve(wsgi_app, host="127.0.0.1")`` -> the base URL of the app on a real
    socket (werkzeug's threaded server; the socket is always on 127.0.0.1, ``host="localhost"``
    names it as another origin). The servers stop when the fixture ends."""
    running: list[tuple[Any, threading.Thread]] = []

    def serve(app: Any, host: str = "127.0.0.1") -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="wsgi", daemon=True
        )
        thread.start()
        running.append((server, thread))
        return f"http://{host}:{server.server_port}"

    yield serve
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(5)


def browser_contexts(browser: Any, **options: Any) -> Iterator[Callable[[], Any]]:
    """For a fixture: ``new_context()`` -> a fresh context of ``browser`` (its own cookie jar,
    ``options`` as Playwright's ``new_context`` takes them), the CDN blocked; all closed when
    the fixture ends."""
    contexts: list[Any] = []

    def make() -> Any:
        ctx = browser.new_context(**options)
        ctx.set_default_timeout(15_000)
        ctx.route(CDN_PATTERN, lambda route: route.abort())
        contexts.append(ctx)
        return ctx

    yield make
    for ctx in contexts:
        ctx.close()
