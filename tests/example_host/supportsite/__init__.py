"""OpenAI's customer-support sample (openai-chatkit-advanced-samples), its meal-preference
feature ported onto this extension as docs/porting.md walks it: a tool that shows a widget, the
widget's action, and thread titles. Their FastAPI ``main.py`` and ``ChatKitServer`` subclass
become this app factory; their ``action()`` dispatch becomes ``@chatkit.action`` (actions.py).
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from .extensions import chatkit


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        CHATKIT_BACKEND="server",
        CHATKIT_AGENT=f"{__name__}.agent:support_agent",  # their support_agent.py
        # CHATKIT_STORE_URL unset: threads in a SQLite file in the instance folder (their
        # MemoryStore lost them on restart); "redis://..." for several gunicorn workers.
        # CHATKIT_TITLE_MODEL unset: titles by the agent's model (their title_agent.py).
    )
    app.config.update(config or {})
    from . import actions  # noqa: F401  (registers the widget's action handler)

    chatkit.init_app(app)
    return app
