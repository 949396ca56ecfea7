"""The site's extension objects, made once and bound to each app in ``create_app``."""

from __future__ import annotations

from flask import current_app
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect

from chatkit_flask import ChatKit

db = SQLAlchemy()
login_manager = LoginManager()
csrf = CSRFProtect()


def site_default_limits() -> str:
    """The site's own default limits, from its ``SITE_DEFAULT_LIMITS`` setting."""
    return str(current_app.config["SITE_DEFAULT_LIMITS"])


# The site's default limits count its own pages; the chat's limits are declared on the same
# limiter, and the chat's routes are exempt from the defaults (CHATKIT_HOST_DEFAULT_LIMITS).
limiter = Limiter(get_remote_address, default_limits=[site_default_limits])
chatkit = ChatKit(limiter=limiter)
