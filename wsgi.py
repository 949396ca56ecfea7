"""WSGI entry point of the standalone service: ``gunicorn -c config/gunicorn.conf.py wsgi:app``.

A missing or invalid setting stops start-up with a message that names the key, and exit code 4:
gunicorn's APP_LOAD_ERROR, on which its arbiter stops the whole server instead of restarting
the worker in a loop (any other code, e.g. 2, is restarted forever). config/gunicorn.conf.py
also checks the settings before any worker is forked.
"""

import sys

from chatkit_flask.service import create_app
from chatkit_flask.settings import ConfigError

CONFIG_ERROR_EXIT = 4  # gunicorn.arbiter.Arbiter.APP_LOAD_ERROR

try:
    app = create_app()
except ConfigError as error:
    sys.stderr.write(f"chatkit-flask: configuration error: {error}\n")
    raise SystemExit(CONFIG_ERROR_EXIT) from None
