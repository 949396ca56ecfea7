"""gunicorn settings for the chatkit-flask service.

Run as:  gunicorn -c config/gunicorn.conf.py wsgi:app

Every setting comes from an environment variable with a default, so the same file
works in the container (values from docker compose's env_file) and on a plain host.
A malformed value stops gunicorn at start-up with a message naming the variable,
instead of silently running with a default: gunicorn prints "Failed to read config
file" plus our ValueError and exits 1.

The file must stay valid on a read-only root filesystem (compose runs the app with
`read_only: true`; only /tmp (tmpfs) and /dev/shm are writable): nothing below makes
gunicorn write outside those two directories.
"""

import os
from logging import Formatter as _Formatter

from gunicorn.glogging import Logger as _GunicornLogger
from gunicorn.glogging import SafeAtoms as _GunicornAtoms

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _read_dotenv():
    """The .env file the app also reads (CHATKIT_ENV_FILE, else the project root's .env), parsed
    by python-dotenv like the app, Flask's CLI and (in effect) Compose; {} when there is none."""
    named = os.environ.get("CHATKIT_ENV_FILE", "").strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = named or os.path.join(root, ".env")
    if not os.path.isfile(path):
        if named:
            raise ValueError(f"CHATKIT_ENV_FILE: file not found: {named}")
        return {}
    from dotenv import dotenv_values

    values = dotenv_values(path, interpolate=False, encoding="utf-8")
    return {key: value for key, value in values.items() if value is not None}


_DOTENV = _read_dotenv()


def _env(name, default):
    """The variable's value, stripped; blank or unset means the default. The environment wins
    over .env, as with docker compose.

    Blank counts as unset because `KEY=` lines are common in env files.
    """
    value = os.environ.get(name, "").strip() or _DOTENV.get(name, "").strip()
    return value if value else default


def _env_int(name, default, minimum=0):
    raw = _env(name, None)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _env_bool(name, default):
    raw = _env(name, None)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{name} must be on/off (or true/false, 1/0), got {raw!r}")


def _env_choice(name, default, choices):
    value = _env(name, default).lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _bind():
    explicit = _env("GUNICORN_BIND", None)
    if explicit is not None:
        # Several addresses may be given, comma-separated ("0.0.0.0:8000,[::]:8000").
        return [part.strip() for part in explicit.split(",") if part.strip()]
    # PORT is the conventional variable of PaaS platforms and of our compose file. HOST is
    # loopback unless told otherwise, so bin/serve on a laptop is not reachable from the
    # network; the image sets HOST=0.0.0.0, since inside a container the loopback interface is
    # unreachable from the host and the proxy.
    host = _env("HOST", "127.0.0.1")
    port = _env_int("PORT", 8000, minimum=1)
    if port > 65535:
        raise ValueError(f"PORT must be <= 65535, got {port}")
    return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]


bind = _bind()

# Minting a secret is one short upstream HTTPS call: the worker mostly waits on I/O.
# gthread serves several requests per process without gevent's monkey-patching pitfalls
# (ssl patched after import); 3 processes x 32 threads = 96 concurrent mints by default.
# Measured (docs/benchmark.md; 2 cores, 64 connections, 50 ms upstream, Redis limits in one
# round trip): 3x32 933-1027 req/s (p99 85-106 ms), 2x32 786-907 (p99 100-132 ms), 4x24
# 822-1045, 2x16 and 4x16 530 and 452 (fewer threads than connections: requests queue).
# Threads must cover the concurrent mints (each holds a thread for the upstream's latency);
# a third process spreads the GIL. ~52 MB per worker. Each thread holds at most one Redis
# and one upstream keep-alive connection.
#
# Server mode (the default: CHATKIT_BACKEND=server, or unset without CHATKIT_WORKFLOW_ID, in the
# environment or .env, as the app decides; see chatkit_flask/settings.py) runs its own worker
# (chatkit_flask/server/asgi_worker.py): one asyncio loop per process writes every reply, the
# Flask app runs in `threads` pool threads per process, so an open reply holds no thread.
# Two processes (one per core of the 2-core machine it is measured on: in a container the core
# count Python sees is the host's, not the container's share, so it is not guessed); each holds
# up to CHATKIT_MAX_STREAMS_PER_WORKER replies (500 unless set). Idle after traffic, the master
# is ~75 MB PSS and a worker ~80 MB (most shared with the master: see when_ready). Measured
# in docs/benchmark.md ("Server mode under load"), against the gthread set-up this replaces
# (3 x 128 threads, one reply per thread) and OpenAI's official sample server.
_BACKEND = _env("CHATKIT_BACKEND", None)
SERVER_MODE = (
    _BACKEND.lower() == "server" if _BACKEND else _env("CHATKIT_WORKFLOW_ID", None) is None
)
SERVER_WORKER = "chatkit_flask.server.asgi_worker.ChatKitWorker"
workers = _env_int("GUNICORN_WORKERS", 2 if SERVER_MODE else 3, minimum=1)
threads = _env_int("GUNICORN_THREADS", 32, minimum=1)
worker_class = _env("GUNICORN_WORKER_CLASS", SERVER_WORKER if SERVER_MODE else "gthread")
if SERVER_MODE and _env("CHATKIT_MAX_STREAMS_PER_WORKER", None) is None:
    # Under gthread each reply holds a thread: keep 8 of them for reads and page loads.
    per_worker = 500 if worker_class == SERVER_WORKER else max(1, threads - 8)
    os.environ["CHATKIT_MAX_STREAMS_PER_WORKER"] = str(per_worker)

# For gthread `timeout` only detects a stuck worker loop (a sync worker would be killed
# mid-request). Keep CHATKIT_UPSTREAM_TIMEOUT (default 15 s, retries included) below it.
timeout = _env_int("GUNICORN_TIMEOUT", 30)
# On SIGTERM (docker stop) in-flight requests get this long to finish. The compose file's
# stop_grace_period (30 s) must be larger, or Docker SIGKILLs gunicorn before it is done.
graceful_timeout = _env_int("GUNICORN_GRACEFUL_TIMEOUT", 20)
# Slightly above gunicorn's 2 s so a browser's follow-up request can reuse the connection
# through a proxy; threads are cheap while idle.
keepalive = _env_int("GUNICORN_KEEPALIVE", 5)

# Recycle workers after N requests (0 = never), with jitter so they do not all restart at
# once. Off by default: the service holds no per-request state that could leak.
max_requests = _env_int("GUNICORN_MAX_REQUESTS", 0)
max_requests_jitter = _env_int("GUNICORN_MAX_REQUESTS_JITTER", 0)

# Proxies whose X-Forwarded-Proto gunicorn believes (wsgi.url_scheme). This does NOT set
# the client IP used by the rate limits: that is CHATKIT_TRUSTED_PROXIES in the app.
forwarded_allow_ips = _env("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

# Containers log to stdout/stderr; Docker / the platform collects and rotates.
loglevel = _env_choice("GUNICORN_LOG_LEVEL", "info", _LOG_LEVELS)
errorlog = "-"
accesslog = "-" if _env_bool("GUNICORN_ACCESS_LOG", True) else None
# Deliberately small: client address, method, path WITHOUT query string (%(U)s, never
# %(r)s or %(q)s), status, bytes, duration in ms and the X-Request-ID response header.
# No cookies (the visitor cookie identifies the user), no User-Agent/Referer, no bodies
# (the response body is the client secret), so access logs hold no credentials.
# Behind a proxy %(h)s is the proxy's address; the app's mint log lines carry the client
# network (after CHATKIT_TRUSTED_PROXIES) and the same request id.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms request_id=%({x-request-id}o)s'


def _log_format():
    """CHATKIT_LOG_FORMAT as the app resolves it: the environment, else .env, else the config
    file (CHATKIT_CONFIG_FILE or config/chatkit.toml). An unreadable config file counts as
    unset here: the app names its error at start-up (when_ready)."""
    value = _env("CHATKIT_LOG_FORMAT", None)
    if value is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = _env("CHATKIT_CONFIG_FILE", None) or os.path.join(root, "config", "chatkit.toml")
        try:
            import tomllib

            with open(path, "rb") as file:
                value = str(tomllib.load(file).get("CHATKIT_LOG_FORMAT", "text"))
        except (OSError, ValueError):
            value = "text"
    value = value.strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"CHATKIT_LOG_FORMAT must be one of text, json, got {value!r}")
    return value


# CHATKIT_LOG_FORMAT=json: gunicorn's own lines (start, stop, workers, access) are JSON objects
# too, so that every line of the service's output parses; text keeps gunicorn's formats.
LOG_FORMAT = _log_format()


class _EscapingLogger(_GunicornLogger):
    """gunicorn's logger, with every access log field escaped by the app's one escaping function
    (chatkit_flask.sanitize.escape_control): %(U)s is the percent-decoded path, so /%0a would
    forge a line and /%1b[2J reach an operator's terminal. Only the fields the format uses are
    escaped (a request's atoms include every header and environ variable)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        # gunicorn's SafeAtoms escapes '"' but not '\\', so '\\"' in a path still ends the
        # quoted field; escape_control(quoted=True) escapes both, and nothing else may add to it.
        self.atoms_wrapper_class = _EscapedAtoms

    def setup(self, cfg):
        super().setup(cfg)
        if LOG_FORMAT == "json":
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    if getattr(handler, "_gunicorn", False):  # not a logconfig's own
                        handler.setFormatter(_JsonLines())

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        # Imported here, in a worker (which has loaded the app): the master may not have (the
        # warm-up is optional, see when_ready).
        from chatkit_flask.sanitize import escape_control

        for name in _access_log_fields(self.cfg.access_log_format):
            value = atoms.get(name)
            if isinstance(value, str):
                atoms[name] = escape_control(value, quoted=True)
        return atoms


class _JsonLines(_Formatter):
    """One JSON object per gunicorn record, in the shape of the app's lines (time, level, logger,
    message: chatkit_flask.logs.JsonFormatter; written out here because the master imports
    nothing of the app). An access line adds the request's fields, ``"event": "access"``."""

    _ACCESS = (("request_id", "{x-request-id}o"), ("method", "m"), ("path", "U"),
               ("status", "s"), ("bytes", "b"), ("duration_ms", "M"), ("remote", "h"))  # fmt: skip

    def format(self, record):
        import json
        import time

        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        atoms = record.args
        if record.name == "gunicorn.access" and isinstance(atoms, _GunicornAtoms):
            entry["event"] = "access"
            for key, atom in self._ACCESS:
                value = atoms[atom]
                if value != "-":
                    entry[key] = int(value) if key in ("status", "bytes", "duration_ms") else value
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class _EscapedAtoms(_GunicornAtoms):
    """SafeAtoms' lookups ('-' for a missing atom, headers in any case) without its escaping."""

    def __init__(self, atoms):
        dict.__init__(self, atoms)


def _access_log_fields(fmt, _cache={}):  # noqa: B006 - a per-process cache
    fields = _cache.get(fmt)
    if fields is None:
        import re

        # Header and environ atoms ({name}i, {name}o, {name}e) are looked up in lower case.
        names = re.findall(r"%\(([^)]+)\)s", fmt)
        fields = _cache[fmt] = tuple({n.lower() if n.startswith("{") else n for n in names})
    return fields


logger_class = _EscapingLogger

# Workers' heartbeat file: on a disk-backed /tmp fchmod() can block and get healthy
# workers killed; /dev/shm is memory-backed (and writable under read_only: true).
worker_tmp_dir = (
    "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
)

# gunicorn >= 25.1 opens a control socket for `gunicornc` by default, at
# $XDG_RUNTIME_DIR/gunicorn.ctl or $HOME/.gunicorn/gunicorn.ctl. In the image $HOME does
# not exist and the root filesystem is read-only, so gunicorn would log an error at each
# start; the socket also lets anyone in the container change the worker count or stop the
# server. Off unless GUNICORN_CONTROL_SOCKET names a path (use one under /tmp).
_control_socket = _env("GUNICORN_CONTROL_SOCKET", None)
if _control_socket is None:
    control_socket_disable = True
else:
    control_socket_disable = False
    control_socket = _control_socket

# Other paths gunicorn could write, all left at their no-disk defaults: pidfile None,
# tmp_upload_dir None, no "dirty" workers (dirty_apps empty; their pid file would go to
# the temp dir, /tmp). Python writes no .pyc files (PYTHONDONTWRITEBYTECODE in the image).
proc_name = "chatkit-flask"


# Prometheus multiprocess mode (chatkit_flask/metrics.py). With several workers each process
# keeps its own metric values; prometheus-client sums them at scrape time only when every
# worker writes them to files in PROMETHEUS_MULTIPROC_DIR, a directory that must exist and
# be empty before the workers start. The hooks below run in the gunicorn master.
_PROMETHEUS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Remembers the directory on_starting created, in the environment rather than a module
# variable so that it survives a config reload (SIGHUP re-executes this file).
_OWNED_DIR = "CHATKIT_GUNICORN_METRICS_DIR"


def on_starting(server):
    """Prepare PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus-client.

    Unset: a private directory under the temp dir (/tmp, a tmpfs in the container), exported
    to the workers through the environment and removed on exit; private so that two gunicorn
    instances on one host never mix or wipe each other's files. Set: created if missing and
    emptied of *.db files left by a previous run. Both happen here, not at config load, so
    --check-config and --print-config have no side effects. (With --preload the app, and
    prometheus-client, would be imported before this hook: leave preload_app off.)
    """
    directory = os.environ.get(_PROMETHEUS_DIR, "").strip()
    try:
        if not directory:
            import tempfile

            directory = tempfile.mkdtemp(prefix="chatkit-prometheus-")
            os.environ[_PROMETHEUS_DIR] = directory
            os.environ[_OWNED_DIR] = directory
        else:
            os.makedirs(directory, exist_ok=True)
            for name in os.listdir(directory):
                if name.endswith(".db"):
                    os.remove(os.path.join(directory, name))
    except OSError as exc:
        # No writable temp dir (e.g. read-only root without a /tmp tmpfs): serve anyway;
        # /metrics then shows the values of whichever worker answers the scrape.
        os.environ.pop(_PROMETHEUS_DIR, None)
        server.log.warning("metrics: no multiprocess directory (%s); per-worker values only", exc)


_SERVICE_APPS = ("wsgi:app", "wsgi")


def when_ready(server):
    """Check the app's settings once, before any worker is forked: a bad or missing one stops
    gunicorn with the message naming the key (exit 4), instead of workers failing one by one.

    The check runs in a forked child so that the master neither reads the settings nor makes
    the app. The warm-up below imports the app's modules, never its metrics: prometheus-client is
    first imported in a worker, after on_starting has set PROMETHEUS_MULTIPROC_DIR; on SIGHUP
    on_reload imports the app's modules again, so new workers run new code.
    """
    import sys

    if getattr(server.app, "app_uri", None) not in _SERVICE_APPS:
        return  # this file serving another app (as tests/test_proxy.py does): not our settings
    told, tell = os.pipe()  # the child names the SQL store's database (never the URL) here
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(told)
        code = 0
        try:
            from chatkit_flask.logs import configure_logging
            from chatkit_flask.service import service_config
            from chatkit_flask.settings import ConfigError, Settings

            configure_logging("INFO", LOG_FORMAT)  # its warnings in the service's format
            settings = Settings.from_mapping(service_config())
            if settings.backend == "server":
                # GUNICORN_WORKER_CLASS=sync would kill long replies: refuse it here, once,
                # rather than in every worker (chatkit_flask/server/workers.py).
                from chatkit_flask.server.store import sql_database
                from chatkit_flask.server.workers import check_gunicorn_worker

                check_gunicorn_worker()
                database = sql_database(settings.store_url or "")
                if database is not None:
                    os.write(tell, database.encode()[:32])
        except ConfigError as error:
            server.log.error("chatkit-flask: configuration error: %s", error)
            code = 4
        except BaseException:
            server.log.exception("chatkit-flask: configuration check failed")
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(tell)
    _, status = os.waitpid(pid, 0)
    sql_database = os.read(told, 32).decode() or None
    os.close(told)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        server.log.error("configuration check failed (exit %s): stopping", code)
        on_exit(server)
        # The APP_LOAD_ERROR code, as when a worker fails to load the app.
        sys.exit(4)
    if SERVER_MODE and worker_class == SERVER_WORKER and _env_bool("CHATKIT_WARM_SDKS", True):
        # The SDKs imported and their lazy models built here, once, before the fork, with the
        # app's modules imported (not run: no app, no settings, no metrics): no worker spends
        # its first visitor's second on it, and the workers share those pages.
        from chatkit_flask.server.warmup import warm_sdks

        warm_sdks(sql_database)


def on_reload(server):
    """SIGHUP: the app's modules the master imported (when_ready) are imported again, so the
    workers it starts run the app's current code, as without the warm-up."""
    import sys

    warmup = sys.modules.get("chatkit_flask.server.warmup")
    if warmup is not None:
        warmup.reimport_app_modules()


def post_worker_init(worker):
    """Server mode drains on SIGTERM (a deploy's `docker stop`): gunicorn stops accepting and
    lets open requests run for graceful_timeout; open replies get graceful_timeout - 3 s, then
    end with an error event asking the visitor to send again (their partial answers kept, slots
    freed), so none is cut silently when gunicorn exits. New messages meanwhile are refused the
    same way at once."""
    import signal

    if type(worker).__module__ == "chatkit_flask.server.asgi_worker":
        return  # that worker drains on its own signal handler
    stop = worker.handle_exit

    def handle_exit(sig, frame):
        stop(sig, frame)
        from chatkit_flask.server.bridge import drain_all

        drain_all(max(1.0, worker.cfg.graceful_timeout - 3))

    signal.signal(signal.SIGTERM, handle_exit)
    signal.siginterrupt(signal.SIGTERM, False)


def child_exit(server, worker):
    """Drop a dead worker's live gauges (its files in PROMETHEUS_MULTIPROC_DIR stay for the
    counters, which must not go backwards)."""
    if os.environ.get(_PROMETHEUS_DIR):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics directory on_starting created (never one the operator named)."""
    import shutil

    directory = os.environ.pop(_OWNED_DIR, "")
    if directory and directory == os.environ.get(_PROMETHEUS_DIR):
        shutil.rmtree(directory, ignore_errors=True)
