"""The tiny server-mode app under a real gunicorn (tests only): model at $FAKE_RESPONSES_URL,
threads in the store at $TEST_STORE_URL."""

from __future__ import annotations

import os

from agents import set_tracing_disabled

from chatkit_flask.server.agent import ModelClient, build_plain_agent
from chatkit_flask.server.bridge import AsyncBridge
from chatkit_flask.server.protocol import FlaskChatKitServer
from chatkit_flask.server.store import open_store
from tests.server_support import make_app

set_tracing_disabled(True)
server = FlaskChatKitServer(
    open_store(os.environ["TEST_STORE_URL"], thread_ttl=3600),
    build_plain_agent("gpt-test", "Answer briefly."),
    ModelClient(
        api_key=os.environ["FAKE_RESPONSES_KEY"], base_url=os.environ["FAKE_RESPONSES_URL"]
    ),
)
app = make_app(server, AsyncBridge())
