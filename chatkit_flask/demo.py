"""The demo chat page (``GET /`` when ``CHATKIT_DEMO=true``) and the offline demo command.

Offline demo, no OpenAI key needed::

    python -m chatkit_flask.demo                     # server mode: a card of choices, then echoes
    python -m chatkit_flask.demo --backend hosted    # hosted mode, fake ChatKit API

then open http://127.0.0.1:8000/. The page configures the widget with ``ChatKitFlask.configure()``
(``static/chatkit-secret.js``); the widget's own script always loads from OpenAI's CDN, and when
it cannot the page says so (server mode then offers the endpoint without the widget).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from typing import TYPE_CHECKING

from flask import Blueprint, Response, make_response, render_template, url_for

if TYPE_CHECKING:
    from .state import ChatKitState

__all__ = ["CHATKIT_CDN_URL", "demo_blueprint", "main"]

CHATKIT_CDN_URL = "https://cdn.platform.openai.com/deployments/chatkit/chatkit.js"
DEMO_API_KEY = "offline-demo-key-not-a-real-openai-key"
DEMO_SECRET_KEY = "offline-demo-secret-key-not-for-production"  # noqa: S105
DEMO_WORKFLOW_ID = "wf_offline_demo"
DEMO_CARD = {"question": "Which example should I show?", "choices": ["A widget", "An action"]}
DEMO_CARD_TEXT = "Pick one above: its button is answered by this app's @chatkit.action handler."
_CHATKIT_ORIGIN = "https://cdn.platform.openai.com"
# Only our own files and ChatKit's component: no inline script or style, no plugins, no <base>
# or form hijack, and the page may not be framed (clickjacking the mint button).
DEMO_CSP = "; ".join(
    [
        "default-src 'none'",
        f"script-src 'self' {_CHATKIT_ORIGIN}",
        "style-src 'self'",
        "img-src 'self' data:",
        f"connect-src 'self' {_CHATKIT_ORIGIN} https://api.openai.com",
        f"frame-src {_CHATKIT_ORIGIN}",
        "base-uri 'none'",
        "form-action 'none'",
        "object-src 'none'",
        "frame-ancestors 'none'",
    ]
)


def demo_blueprint(state: ChatKitState) -> Blueprint:
    """``GET /``: the demo page for the app's backend. Not rate limited (the chat endpoints
    are)."""
    bp = Blueprint("chatkit_demo", __name__, template_folder="templates")

    backend = state.settings.backend

    @bp.get("/")
    def index() -> Response:
        config_url = url_for("chatkit.config")
        chat_url = url_for("chatkit.chatkit") if backend == "server" else ""
        response = make_response(
            render_template(
                "demo.html",
                backend=backend,
                prefix=config_url.removesuffix("/config"),
                config_url=config_url,
                chat_url=chat_url,
                endpoint=chat_url or url_for("chatkit.secret"),
                helper_js=url_for("chatkit.static", filename="chatkit-secret.js"),
                demo_js=url_for("chatkit.static", filename="demo.js"),
                demo_css=url_for("chatkit.static", filename="demo.css"),
                chatkit_cdn=CHATKIT_CDN_URL,
            )
        )
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = DEMO_CSP
        response.headers["X-Frame-Options"] = "DENY"  # frame-ancestors for older browsers
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    state.exempt(bp)
    return bp


def main(argv: list[str] | None = None) -> int:
    """Run the service with the demo page, offline: hosted mode against an in-process fake
    ChatKit API, server mode against an in-process fake model (Responses API)."""
    parser = argparse.ArgumentParser(
        prog="python -m chatkit_flask.demo",
        description="Offline demo: the service and its demo page against fake OpenAI APIs.",
    )
    parser.add_argument(
        "--backend",
        choices=("hosted", "server"),
        default="server",
        help="server (default): serve the ChatKit protocol here, answered by a fake model that "
        "echoes you (its first answer is a card of buttons); hosted: mint fake client secrets",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--latency", type=float, default=0.15, help="hosted: fake seconds per mint (default 0.15)"
    )
    parser.add_argument(
        "--token-delay",
        type=float,
        default=0.05,
        help="server: fake model's seconds between streamed words (default 0.05)",
    )
    args = parser.parse_args(argv)

    from werkzeug.serving import run_simple

    from .service import create_app

    config: dict[str, object] = {
        "OPENAI_API_KEY": DEMO_API_KEY,
        "SECRET_KEY": DEMO_SECRET_KEY,
        "SECRET_KEY_FALLBACKS": "",
        "CHATKIT_DEMO": True,
        "CHATKIT_COOKIE_SECURE": False,
        "RATELIMIT_STORAGE_URI": os.environ.get("RATELIMIT_STORAGE_URI") or "memory://",
    }
    url = f"http://{args.host}:{args.port}/"
    with contextlib.ExitStack() as stack:
        if args.backend == "server":
            from .testing.fake_responses import FakeResponses, Reply

            model = stack.enter_context(
                FakeResponses(api_key=DEMO_API_KEY, token_delay=args.token_delay)
            )
            # The first answer is the demo agent's card (server/demo_site.py), then echoes.
            model.enqueue(Reply.call_tool("offer_choices", DEMO_CARD), DEMO_CARD_TEXT)
            threads = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatkit-demo-"))
            config.update(
                CHATKIT_BACKEND="server",
                OPENAI_BASE_URL=model.base_url,
                CHATKIT_AGENT_INSTRUCTIONS="Offline demo: a fake model echoes the visitor.",
                CHATKIT_STORE_URL=f"sqlite:///{threads}/threads.db",
            )
            fakes = (
                f"  fake model (Responses API) at {model.base_url}: a card of choices first, then "
                f"echoes at {args.token_delay} s per word; threads in {threads} (deleted on exit)"
            )
        else:
            from .testing.fake_chatkit import FakeChatKit

            upstream = stack.enter_context(
                FakeChatKit(api_key=DEMO_API_KEY, latency=args.latency)
            )
            config.update(
                CHATKIT_BACKEND="hosted",
                CHATKIT_WORKFLOW_ID=DEMO_WORKFLOW_ID,
                CHATKIT_ALLOWED_WORKFLOWS="",
                CHATKIT_API_BASE=upstream.base_url,
            )
            fakes = f"  fake ChatKit API at {upstream.base_url}"
        app = create_app(config)
        print(
            f"chatkit-flask offline demo ({args.backend} mode): open {url}\n{fakes}\n"
            "  No OpenAI key is used. The chat widget's script still loads from OpenAI's CDN: "
            "without it the page says so.\n  Ctrl+C to stop.",
            flush=True,
        )
        run_simple(args.host, args.port, app, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
