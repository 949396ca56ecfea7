"""The site's extension objects, made once and bound to each app in ``create_app``."""

from __future__ import annotations

from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect

from chatkit_flask import ChatKit

db = SQLAlchemy()
login_manager = LoginManager()
csrf = CSRFProtect()
# The site's own default limits; the chat's limits are declared on the same limiter.
limiter = Limiter(get_remote_address, default_limits=["200 per minute"])
chatkit = ChatKit(limiter=limiter)
