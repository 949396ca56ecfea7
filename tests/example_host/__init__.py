"""A host app written the way the README shows: Flask-Limiter, Flask-Login and Flask-WTF's
CSRFProtect, with the ChatKit extension added by its README lines."""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager, UserMixin, current_user, login_user
from flask_wtf.csrf import CSRFProtect

from chatkit_flask import ChatKit

limiter = Limiter(get_remote_address, default_limits=["100 per minute"])
login_manager = LoginManager()
csrf = CSRFProtect()
chatkit = ChatKit(limiter=limiter)


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


@login_manager.user_loader
def load_user(user_id: str) -> User:
    return User(user_id)


@chatkit.user_loader
def chat_user() -> str | None:
    return current_user.get_id() if current_user.is_authenticated else None


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(config or {})
    limiter.init_app(app)
    login_manager.init_app(app)
    csrf.init_app(app)
    chatkit.init_app(app)
    csrf.exempt(app.blueprints["chatkit"])  # the chat checks Origin itself

    @app.post("/login")
    @csrf.exempt
    def login() -> Any:
        login_user(User(request.form["user"]))
        return jsonify(ok=True)

    @app.get("/shop")
    def shop() -> Any:
        return jsonify(items=[])

    return app
