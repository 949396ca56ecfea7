"""Signing in and out (Flask-Login), and who the chat talks to."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, jsonify, request
from flask_login import current_user, login_user, logout_user

from .extensions import chatkit, csrf, db, login_manager
from .models import User

bp = Blueprint("auth", __name__)


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    return db.session.get(User, int(user_id))


@chatkit.user_loader
def chat_user() -> int | None:
    """The chat's user: the site's own user id (an int), or None for a visitor."""
    return current_user.id if current_user.is_authenticated else None


@bp.post("/login")
@csrf.exempt  # a JSON API for the tests; the site's HTML form would carry the token
def login() -> Any:
    user = db.session.execute(
        db.select(User).filter_by(email=request.form["email"])
    ).scalar_one_or_none()
    if user is None:
        abort(403)
    login_user(user)
    return jsonify(ok=True, id=user.id)


@bp.post("/logout")
@csrf.exempt
def logout() -> Any:
    # Hook for the "siteops" work: what the chat forgets or keeps on log-out goes here.
    logout_user()
    return jsonify(ok=True)
