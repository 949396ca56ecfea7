"""The site's users, in its own database."""

from __future__ import annotations

from flask_login import UserMixin
from sqlalchemy import String
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Mapped, mapped_column

from .extensions import db


class User(UserMixin, db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    plan: Mapped[str] = mapped_column(String(50))


SEED_USERS = [
    ("ada@example.com", "Ada Lovelace", "pro"),
    ("grace@example.com", "Grace Hopper", "free"),
]


def seed() -> None:
    """Create the tables and the two demo users once (ids 1 and 2). Every gunicorn worker runs
    this as it starts: one that loses the race finds the tables or the users made by another
    (a site with migrations runs them once, before the workers, instead)."""
    try:
        db.create_all()
    except OperationalError:  # "table user already exists": another worker made it meanwhile
        db.session.rollback()
    if db.session.query(User).first() is None:
        db.session.add_all(User(email=e, name=n, plan=p) for e, n, p in SEED_USERS)
        try:
            db.session.commit()
        except IntegrityError:  # another worker added them meanwhile
            db.session.rollback()
