"""A second host app, the way the README's host-app section builds one: Flask-SQLAlchemy,
Flask-Login, CSRFProtect and Flask-Limiter with its own default limits, and the chat in server
mode with an agent tool that reads the site's database for the signed-in user.

``create_app(test_config=None)`` reads ``FLASK_*`` environment variables (JSON values) when no
test config is given, e.g. under gunicorn::

    FLASK_OPENAI_BASE_URL=... gunicorn -k gthread --threads 8 'sqlsite:create_app()'
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify
from flask_login import current_user, login_required
from sqlalchemy.pool import QueuePool

from .extensions import chatkit, csrf, db, limiter, login_manager
from .models import User, seed


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI="sqlite:///site.db",
        # A real pool: a connection that is not given back shows in checkedout().
        SQLALCHEMY_ENGINE_OPTIONS={"poolclass": QueuePool, "pool_size": 5, "max_overflow": 10},
        CHATKIT_BACKEND="server",
        CHATKIT_AGENT=f"{__name__}.agent:assistant",
        SITE_POOL_STATUS=False,
    )
    if test_config is None:
        app.config.from_prefixed_env()
    else:
        app.config.update(test_config)

    db.init_app(app)
    login_manager.init_app(app)
    csrf.init_app(app)
    limiter.init_app(app)
    chatkit.init_app(app)
    csrf.exempt(app.blueprints["chatkit"])  # the chat checks Origin itself
    # Hooks for the "siteops" work (usage and its reset, the chat under the site's default
    # limits, thread TTL) attach here.

    from . import auth

    app.register_blueprint(auth.bp)

    @app.get("/account")
    @login_required
    def account() -> Any:
        return jsonify(name=current_user.name, plan=current_user.plan)

    if app.config["SITE_POOL_STATUS"]:

        @app.get("/_pool")
        def pool_status() -> Any:
            """Connections the database pool has handed out and not had back (tests)."""
            return jsonify(checked_out=db.engine.pool.checkedout())

    with app.app_context():
        seed()
    return app


__all__ = ["User", "create_app"]
