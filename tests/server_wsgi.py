"""The tiny server-mode app under a real gunicorn (tests only): model at $FAKE_RESPONSES_URL."""

from __future__ import annotations

import os

from agents import set_tracing_disabled

from chatkit_flask.server.agent import ModelClient, build_plain_agent
from chatkit_flask.server.bridge import AsyncBridge
from chatkit_flask.server.protocol import FlaskChatKitServer
from tests.server_support import MemoryStore, make_app

set_tracing_disabled(True)
server = FlaskChatKitServer(
    MemoryStore(),
    build_plain_agent("gpt-test", "Answer briefly."),
    ModelClient(
        api_key=os.environ["FAKE_RESPONSES_KEY"], base_url=os.environ["FAKE_RESPONSES_URL"]
    ),
)
app = make_app(server, AsyncBridge())
