"""What a host app needs in its own tests (importing this never imports pytest).

- :class:`FakeChatKit`: a fake ChatKit sessions API on a real loopback socket (a context
  manager); point ``CHATKIT_API_BASE`` at its ``base_url``.
- :class:`FakeResponses` (server mode): a fake OpenAI Responses API on a loopback socket that
  streams replies with token usage, and can call the site's tools (``Reply.call_tool``, or a
  whole ``Turn``: tool calls, then the answer; from ``chatkit_flask.testing.fake_responses``).
- :func:`chatkit_test_config`: the settings a test app needs against either fake, limits off.
- :class:`~chatkit_flask.testing.redis_server.RedisServer`: a private ``redis-server`` on a
  free port in a temporary directory (a context manager), for tests that need a real Redis
  without touching anyone's data.
- :func:`reset_limits`: clear every counter of the app's limiter between tests that keep
  limits on.
- :class:`ChatKitDriver` (server mode): one visitor's conversation against the app's own
  endpoint through its test client, as the ChatKit widget holds it: ``new_thread``/``send`` a
  message, click a widget's ``action``/``sync_action``, hand back a ``client_tool_output``,
  read ``items()``/``threads()``, ``rename``/``delete``/``feedback``. Streams come back parsed
  as :class:`Events` (``.text`` of the answer, ``.widgets``, ``.progress``, ``.errors``,
  ``.thread_id``); a non-2xx answer raises :class:`ChatKitHTTPError` (``.status``,
  ``.code``). Its test client keeps the visitor cookie: one driver is one visitor.
- ``pytest_plugins = ["chatkit_flask.testing.pytest_plugin"]`` in a ``conftest.py`` gives the
  ``chatkit_api`` fixture (hosted mode) and the ``chatkit_model`` fixture (server mode): a
  started fake, reset for each test.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Flask

from .driver import ChatKitDriver, ChatKitHTTPError, Events
from .fake_chatkit import Behaviour, FakeChatKit

if TYPE_CHECKING:
    from .fake_responses import FakeResponses


def __getattr__(name: str) -> Any:
    # Imported on first use, not with the package: `python -m chatkit_flask.testing.fake_responses`
    # (the fake's CLI) would otherwise find its own module imported before it runs, and Python
    # prints a RuntimeWarning before the CLI's first line.
    if name == "FakeResponses":
        from .fake_responses import FakeResponses

        return FakeResponses
    raise AttributeError(name)

__all__ = [
    "TEST_API_KEY",
    "TEST_WORKFLOW_ID",
    "Behaviour",
    "ChatKitDriver",
    "ChatKitHTTPError",
    "Events",
    "FakeChatKit",
    "FakeResponses",
    "chatkit_test_config",
    "reset_limits",
]

TEST_API_KEY = "chatkit-flask-test-key-not-a-real-key"
TEST_WORKFLOW_ID = "wf_chatkit_flask_test"


def chatkit_test_config(
    fake: FakeChatKit | FakeResponses | None = None, **overrides: Any
) -> dict[str, Any]:
    """Settings for a test app, with every limit off (``RATELIMIT_ENABLED=False``,
    Flask-Limiter's own switch, which also turns off a host limiter handed to the extension;
    pass ``RATELIMIT_ENABLED=True`` to test limits) and a plain-HTTP cookie.

    With a :class:`FakeChatKit`: hosted mode against it. With a ``FakeResponses``: server mode
    with the model at the fake (``OPENAI_BASE_URL``) and threads in a SQLite file of a new
    temporary directory (removed at exit; no Redis needed) and thread titles off
    (``CHATKIT_TITLE_MODEL=off``: one model call per message, so the replies a test enqueues
    answer its messages). ``overrides`` win over both.
    """
    config: dict[str, Any] = {
        "OPENAI_API_KEY": TEST_API_KEY,
        "SECRET_KEY": "test-cookie-signing-key-for-chatkit_flask-0123456789",
        "CHATKIT_COOKIE_SECURE": False,
        "RATELIMIT_ENABLED": False,
        "RATELIMIT_STORAGE_URI": "memory://",
    }
    from .fake_responses import FakeResponses

    if isinstance(fake, FakeResponses):
        config["CHATKIT_BACKEND"] = "server"
        config["OPENAI_BASE_URL"] = fake.base_url
        config["CHATKIT_STORE_URL"] = f"sqlite:///{_temporary_dir() / 'chatkit-threads.db'}"
        config["CHATKIT_TITLE_MODEL"] = "off"
    else:
        config["CHATKIT_WORKFLOW_ID"] = TEST_WORKFLOW_ID
        if fake is not None:
            config["CHATKIT_BACKEND"] = "hosted"
            config["CHATKIT_API_BASE"] = fake.base_url
    if fake is not None and fake.api_key:
        config["OPENAI_API_KEY"] = fake.api_key
    config.update(overrides)
    return config


def _temporary_dir() -> Path:
    path = tempfile.mkdtemp(prefix="chatkit-test-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def reset_limits(app: Flask) -> None:
    """Forget every counter of the limiter that holds the chat's limits on ``app``."""
    limiter = app.extensions["chatkit"].limiter
    if limiter.enabled and limiter.initialized:
        limiter.reset()
