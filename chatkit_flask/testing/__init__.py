"""What a host app needs in its own tests (importing this never imports pytest).

- :class:`FakeChatKit`: a fake ChatKit sessions API on a real loopback socket (a context
  manager); point ``CHATKIT_API_BASE`` at its ``base_url``.
- :func:`chatkit_test_config`: the settings a test app needs against that fake, limits off.
- :class:`FakeResponses` (server mode; needs ``chatkit-flask[server]``): a fake OpenAI
  Responses API on a loopback socket that streams replies with token usage; point
  ``OPENAI_BASE_URL`` at its ``base_url``. Import it from
  ``chatkit_flask.testing.fake_responses``.
- :class:`~chatkit_flask.testing.redis_server.RedisServer`: a private ``redis-server`` on a
  free port in a temporary directory (a context manager), for tests that need a real Redis
  without touching anyone's data.
- :func:`reset_limits`: clear every counter of the app's limiter between tests that keep
  limits on.
- ``pytest_plugins = ["chatkit_flask.testing.pytest_plugin"]`` in a ``conftest.py`` gives the
  ``chatkit_api`` fixture (a started fake, reset for each test).
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from .fake_chatkit import Behaviour, FakeChatKit

__all__ = [
    "TEST_API_KEY",
    "TEST_WORKFLOW_ID",
    "Behaviour",
    "FakeChatKit",
    "chatkit_test_config",
    "reset_limits",
]

TEST_API_KEY = "chatkit-flask-test-key-not-a-real-key"
TEST_WORKFLOW_ID = "wf_chatkit_flask_test"


def chatkit_test_config(fake: FakeChatKit | None = None, **overrides: Any) -> dict[str, Any]:
    """Settings for a test app: the fake's address and key, a plain-HTTP cookie and every
    limit off (``RATELIMIT_ENABLED=False``, Flask-Limiter's own switch, which also turns off
    a host limiter handed to the extension). Pass ``RATELIMIT_ENABLED=True`` to test limits."""
    config: dict[str, Any] = {
        "OPENAI_API_KEY": TEST_API_KEY,
        "SECRET_KEY": "test-cookie-signing-key-for-chatkit_flask-0123456789",
        "CHATKIT_WORKFLOW_ID": TEST_WORKFLOW_ID,
        "CHATKIT_COOKIE_SECURE": False,
        "RATELIMIT_ENABLED": False,
        "RATELIMIT_STORAGE_URI": "memory://",
    }
    if fake is not None:
        config["CHATKIT_API_BASE"] = fake.base_url
        if fake.api_key:
            config["OPENAI_API_KEY"] = fake.api_key
    config.update(overrides)
    return config


def reset_limits(app: Flask) -> None:
    """Forget every counter of the limiter that holds the chat's limits on ``app``."""
    limiter = app.extensions["chatkit"].limiter
    if limiter.enabled and limiter.initialized:
        limiter.reset()
