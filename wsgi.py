"""WSGI entry point of the standalone service: ``gunicorn -c config/gunicorn.conf.py wsgi:app``.

A missing or invalid setting stops start-up with a message that names the key.
"""

import sys

from chatkit_flask.service import create_app
from chatkit_flask.settings import ConfigError

try:
    app = create_app()
except ConfigError as error:
    sys.stderr.write(f"chatkit-flask: configuration error: {error}\n")
    raise SystemExit(2) from None
