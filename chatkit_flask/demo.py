"""The demo chat page (``GET /`` when ``CHATKIT_DEMO=true``) and the offline demo command.

Offline demo, no OpenAI key needed (the service runs against the fake ChatKit API)::

    python -m chatkit_flask.demo            # then open http://127.0.0.1:8000/

The page mints secrets through ``static/chatkit-secret.js``; the chat itself loads OpenAI's
ChatKit web component from the CDN and so needs OpenAI's service.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from flask import Blueprint, Response, make_response, render_template, url_for

if TYPE_CHECKING:
    from .state import ChatKitState

__all__ = ["CHATKIT_CDN_URL", "demo_blueprint", "main"]

CHATKIT_CDN_URL = "https://cdn.platform.openai.com/deployments/chatkit/chatkit.js"
DEMO_API_KEY = "offline-demo-key-not-a-real-openai-key"
DEMO_SECRET_KEY = "offline-demo-secret-key-not-for-production"  # noqa: S105
DEMO_WORKFLOW_ID = "wf_offline_demo"
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
    """``GET /``: the demo page. Not rate limited (only the mint endpoint is)."""
    bp = Blueprint("chatkit_demo", __name__, template_folder="templates")

    @bp.get("/")
    def index() -> Response:
        response = make_response(
            render_template(
                "demo.html",
                endpoint=url_for("chatkit.secret"),
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
    """Run the service with the demo page against an in-process fake ChatKit API."""
    parser = argparse.ArgumentParser(
        prog="python -m chatkit_flask.demo",
        description="Offline demo: the service and its demo page against a fake ChatKit API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--latency", type=float, default=0.15, help="fake upstream seconds per mint (default 0.15)"
    )
    args = parser.parse_args(argv)

    from werkzeug.serving import run_simple

    from .service import create_app
    from .testing.fake_chatkit import FakeChatKit

    fake = FakeChatKit(api_key=DEMO_API_KEY, latency=args.latency).start()
    try:
        app = create_app(
            {
                "OPENAI_API_KEY": DEMO_API_KEY,
                "SECRET_KEY": DEMO_SECRET_KEY,
                "SECRET_KEY_FALLBACKS": "",
                "CHATKIT_WORKFLOW_ID": DEMO_WORKFLOW_ID,
                "CHATKIT_ALLOWED_WORKFLOWS": "",
                "CHATKIT_API_BASE": fake.base_url,
                "CHATKIT_DEMO": True,
                "CHATKIT_COOKIE_SECURE": False,
                "RATELIMIT_STORAGE_URI": os.environ.get("RATELIMIT_STORAGE_URI") or "memory://",
            }
        )
        url = f"http://{args.host}:{args.port}/"
        print(
            f"chatkit-flask offline demo: open {url}\n"
            f"  fake ChatKit API at {fake.base_url} (no OpenAI key used; the chat widget "
            "itself needs OpenAI's service)\n  Ctrl+C to stop.",
            flush=True,
        )
        run_simple(args.host, args.port, app, threaded=True, use_reloader=False)
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
