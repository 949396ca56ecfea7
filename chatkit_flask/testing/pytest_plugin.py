"""pytest fixtures for host apps: ``pytest_plugins = ["chatkit_flask.testing.pytest_plugin"]``.

``chatkit_api``: a :class:`~chatkit_flask.testing.FakeChatKit` on a loopback socket, started
once per session and reset for each test (recorded requests, scripted faults, latency).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import TEST_API_KEY, FakeChatKit


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
