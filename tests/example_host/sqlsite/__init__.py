"""A second host app, the way the README's host-app section builds one: Flask-SQLAlchemy,
Flask-Login, CSRFProtect and Flask-Limiter with its own default limits, and the chat in server
mode with an agent tool that reads the site's database for the signed-in user.

``create_app(test_config=None)`` reads ``FLASK_*`` environment variables (JSON values) when no
test config is given, e.g. under gunicorn::

    FLASK_OPENAI_BASE_URL=... gunicorn -k gthread --threads 8 'sqlsite:create_app()'
"""

from __future__ import annotations

import os
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
        SITE_DEFAULT_LIMITS="200 per minute",  # the site's pages; never the chat's routes
        # Log-out forgets the anonymous visitor by itself (Flask-Login's logout_user(),
        # CHATKIT_FORGET_VISITOR_ON_LOGOUT defaults to true). This shop also lets a visitor
        # keep what they asked before signing in: login_user() gives those threads to the
        # account. Off by default, as in the extension; FLASK_CHATKIT_ADOPT_VISITOR_THREADS=true.
        CHATKIT_ADOPT_VISITOR_THREADS=False,
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
    # Nothing more for the operator's side: `flask chatkit usage|reset|limits|prune` come with
    # the extension, and the chat's routes are exempt from the site's default limits.

    from . import auth

    app.register_blueprint(auth.bp)

    @app.get("/")
    def home() -> Any:
        """A page of the site: counted by the site's default limits."""
        return jsonify(site="shop")

    @app.get("/account")
    @login_required
    def account() -> Any:
        return jsonify(name=current_user.name, plan=current_user.plan)

    if app.config["SITE_POOL_STATUS"]:

        @app.get("/_pool")
        @limiter.exempt
        def pool_status() -> Any:
            """Connections the database pool has handed out and not had back, and which worker
            process answers (tests; exempt from the site's limits, since tests poll it until
            each worker has answered)."""
            return jsonify(checked_out=db.engine.pool.checkedout(), worker=os.getpid())

    with app.app_context():
        seed()
    return app


__all__ = ["User", "create_app"]
