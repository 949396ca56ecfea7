"""pytest fixtures for host apps: ``pytest_plugins = ["chatkit_flask.testing.pytest_plugin"]``.

``chatkit_api`` (hosted mode): a :class:`~chatkit_flask.testing.FakeChatKit` on a loopback
socket, started once per session and reset for each test (recorded requests, scripted faults,
latency). ``chatkit_model`` (server mode; needs ``chatkit-flask[server]``): a
``FakeResponses`` the same way (recorded requests, scripted replies and tool calls, token delay).
Hand either to :func:`~chatkit_flask.testing.chatkit_test_config`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from . import TEST_API_KEY, FakeChatKit

if TYPE_CHECKING:
    from .fake_responses import FakeResponses


@pytest.fixture(scope="session")
def _chatkit_api_server() -> Iterator[FakeChatKit]:
    with FakeChatKit(api_key=TEST_API_KEY) as server:
        yield server


@pytest.fixture
def chatkit_api(_chatkit_api_server: FakeChatKit) -> Iterator[FakeChatKit]:
    """The fake ChatKit sessions API, reset for this test."""
    server = _chatkit_api_server
    server.set_default(None)
    server.latency = 0.0
    server.clear()
    yield server
    server.set_default(None)
    server.latency = 0.0
    server.clear()


@pytest.fixture(scope="session")
def _chatkit_model_server() -> Iterator[FakeResponses]:
    from .fake_responses import FakeResponses

    with FakeResponses(api_key=TEST_API_KEY) as server:
        yield server


@pytest.fixture
def chatkit_model(_chatkit_model_server: FakeResponses) -> Iterator[FakeResponses]:
    """The fake Responses API (server mode's model), reset for this test: it echoes the last
    user message unless replies are enqueued."""
    server = _chatkit_model_server
    server.clear()
    server.token_delay = 0.0
    yield server
    server.clear()
    server.token_delay = 0.0
