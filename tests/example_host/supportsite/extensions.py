"""The site's extension objects, made once and bound to each app in ``create_app``."""

from __future__ import annotations

from chatkit_flask import ChatKit

chatkit = ChatKit()
