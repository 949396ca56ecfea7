"""Typed settings: every knob has one name, one default and one parser, checked once at start-up."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values
from limits import parse_many
from limits.storage import SCHEMES

from .sanitize import mask_url

__all__ = [
    "OPTIONS",
    "ConfigError",
    "Option",
    "Settings",
    "backend_of",
    "load_config",
    "options_in_reading_order",
    "read_env_file",
]


class ConfigError(ValueError):
    """A configuration value is missing or invalid. ``key`` names the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


# The synchronous storages of `limits` (the async+ ones cannot serve a WSGI app).
_STORAGE_SCHEMES = frozenset(name for name in SCHEMES if not name.startswith("async+"))
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {type(value).__name__}")
    return value.strip()


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(key, f"must be true or false, got {value!r}")


def _int_range(lo: int, hi: int | None) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, bool):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ConfigError(key, f"must be an integer, got {value!r}") from None
        if number < lo or (hi is not None and number > hi):
            bound = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
            raise ConfigError(key, f"must be an integer {bound}, got {number}")
        return number

    return parse


def _float_range(lo: float, hi: float) -> Callable[[str, Any], float]:
    def parse(key: str, value: Any) -> float:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise ConfigError(key, f"must be a number, got {value!r}") from None
        if not lo < number <= hi:
            raise ConfigError(key, f"must be a number above {lo} and at most {hi}, got {number}")
        return number

    return parse


def _list(key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


def _limit(key: str, value: Any) -> str:
    """One rule for every limit key: unset or empty means the default, ``off`` turns the limit
    off, anything else must be Flask-Limiter notation that can admit at least one request."""
    text = _as_str(key, value)
    if text.lower() == "off":
        return ""
    try:
        items = parse_many(text)
    except ValueError:
        raise ConfigError(
            key,
            f"is not a valid rate limit string: {text!r} "
            "(use Flask-Limiter notation, e.g. '10 per minute;100 per day', or 'off')",
        ) from None
    if any(item.amount < 1 for item in items):
        raise ConfigError(key, f"{text!r} can never admit a request; use 'off' to turn it off")
    return text


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _http_url(key: str, value: Any) -> str:
    """The API base the key is sent to: https (http only to a loopback host, as the tests and
    fakes use), no userinfo (``https://api.openai.com@evil.example`` is evil.example), no query
    or fragment; a trailing ``/v1`` is dropped, since the client adds it."""
    text = _as_str(key, value).rstrip("/")
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(key, f"must be an https URL, got {mask_url(text)!r}") from None
    if parts.scheme not in {"http", "https"} or not host:
        raise ConfigError(key, f"must be an https URL, got {mask_url(text)!r}")
    if "@" in parts.netloc:
        raise ConfigError(
            key,
            f"must not contain a user or password (the key would go to the host after '@'), "
            f"got {mask_url(text)!r}",
        )
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ConfigError(key, f"must not have a query or fragment, got {mask_url(text)!r}")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigError(key, f"must use https (http only for a loopback host), got {text!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _openai_base_url(key: str, value: Any) -> str:
    """The same checks as an API base, but the path is kept as given: the openai client's
    base URL includes the ``/v1`` (``https://api.openai.com/v1``, a proxy's own path)."""
    _http_url(key, value)
    return _as_str(key, value).rstrip("/")


_MIN_SECRET_KEY_BYTES = 32


def _check_secret_key(secret_key: str, config: Mapping[str, Any]) -> None:
    # A short key makes the visitor cookie's HMAC guessable offline; Flask's debug and testing
    # modes may keep short throwaway keys.
    if len(secret_key.encode()) >= _MIN_SECRET_KEY_BYTES:
        return
    if any(_bool(flag, config.get(flag) or False) for flag in ("DEBUG", "TESTING")):
        return
    raise ConfigError(
        "SECRET_KEY",
        f"must be at least {_MIN_SECRET_KEY_BYTES} bytes, got {len(secret_key.encode())} "
        '(python -c "import secrets; print(secrets.token_urlsafe(32))")',
    )


def _prefix(key: str, value: Any) -> str:
    text = _as_str(key, value).rstrip("/")
    if not text.startswith("/") or not re.fullmatch(r"[A-Za-z0-9/_.~-]+", text):
        raise ConfigError(key, f"must be a URL path starting with '/', got {text!r}")
    return text


def _title_model(key: str, value: Any) -> str:
    text = _as_str(key, value)
    return text.lower() if text.lower() == "off" else (_token(key, text) if text else "")


def _model_or_off(key: str, value: Any) -> str:
    """A model name, or "" for ``off`` (the feature is off)."""
    text = _as_str(key, value)
    return "" if text.lower() == "off" else _token(key, text)


def _token(key: str, value: Any) -> str:
    text = _as_str(key, value)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", text):
        raise ConfigError(key, f"must be an identifier (letters, digits, _.:-), got {text!r}")
    return text


def _agent_spec(key: str, value: Any) -> str:
    text = _as_str(key, value)
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", text):
        raise ConfigError(key, f"must be 'package.module:name', got {text!r}")
    return text


def _store_url(key: str, value: Any) -> str:
    text = _as_str(key, value)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    database = scheme.partition("+")[0]  # SQLAlchemy URLs name a driver: postgresql+psycopg
    if scheme not in {"sqlite", "redis", "rediss", "unix"} and database not in _SQL_DATABASES:
        raise ConfigError(
            key, "must be sqlite:///path, redis://host:6379/db or postgresql+psycopg://host/db"
        )
    return text


_SQL_DATABASES = frozenset({"postgresql", "mysql", "mariadb", "sqlite"})


def _table_prefix(key: str, value: Any) -> str:
    text = _as_str(key, value)
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,29}", text):
        raise ConfigError(
            key, f"must be lower-case letters, digits and _ (at most 30), got {text!r}"
        )
    return text


def _files_url(key: str, value: Any) -> str:
    text = _as_str(key, value)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme not in {"file", "s3"}:
        raise ConfigError(
            key, f"must be file:///path or s3://bucket/prefix, got {mask_url(text)!r}"
        )
    return text


def _endpoint_url(key: str, value: Any) -> str:
    """An S3-compatible service's URL: http(s), a host, no user or password (credentials come
    from the AWS variables)."""
    text = _as_str(key, value).rstrip("/")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(key, f"must be an http(s) URL, got {mask_url(text)!r}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname or "@" in parts.netloc:
        raise ConfigError(
            key, f"must be an http(s) URL without credentials, got {mask_url(text)!r}"
        )
    return text


def _attachment_types(key: str, value: Any) -> tuple[str, ...]:
    types = tuple(item.lower() for item in _list(key, value))
    for mime in types:
        if mime == "image/svg+xml":
            raise ConfigError(key, "image/svg+xml is refused: an SVG is a document that can run "
                              "scripts, and has no signature to check it by")  # fmt: skip
        if not re.fullmatch(r"image/[a-z0-9.+-]+|application/pdf", mime):
            raise ConfigError(
                key, f"lists MIME types the model reads: image/... or application/pdf, got {mime!r}"
            )
    if not types:
        raise ConfigError(key, "must name at least one type (or set CHATKIT_ATTACHMENTS=false)")
    return types


def _key_prefix(key: str, value: Any) -> str:
    text = _as_str(key, value)
    return _token(key, text) if text else ""


def _workflow_version(key: str, value: Any) -> str:
    text = _token(key, value)
    if text.lower() == "latest":
        # The API accepts the session but the chat then fails silently (chatkit-js #41).
        raise ConfigError(key, "'latest' is not a version; leave it empty for the latest one")
    return text


def _origins(key: str, value: Any) -> tuple[str, ...]:
    origins = _list(key, value)
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in {"http", "https"} or not parts.netloc or parts.path:
            raise ConfigError(
                key, f"must list origins like 'https://shop.example.com', got {origin!r}"
            )
    return tuple(origin.rstrip("/") for origin in origins)


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        text = _as_str(key, value).lower()
        if text not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(allowed)}; got {value!r}")
        return text

    return parse


def _storage_uri(key: str, value: Any) -> str:
    text = _as_str(key, value)
    scheme = text.partition("://")[0]
    if "://" not in text or scheme not in _STORAGE_SCHEMES:
        # Checked here, with the URI's password masked: the storage's own error quotes it whole.
        raise ConfigError(
            key,
            f"must be a storage URI such as redis://host:6379/0 (schemes: "
            f"{', '.join(sorted(_STORAGE_SCHEMES))}), got {mask_url(text)!r}",
        )
    return text


def _networks(key: str, value: Any) -> tuple[str, ...]:
    networks = []
    for item in _list(key, value):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(key, f"must list networks like '10.0.0.0/8', got {item!r}") from None
    return tuple(networks)


@dataclass(frozen=True)
class Option:
    """One configuration key: its default (None = unset), parser and meaning."""

    name: str
    default: Any
    parse: Callable[[str, Any], Any]
    help: str
    required: bool = False
    secret: bool = False


_OPTION_LIST = [
    Option(
        "OPENAI_API_KEY",
        None,
        _as_str,
        "OpenAI API key: server mode calls the model with it, hosted mode mints with it (a key of "
        "the workflow's project).",
        True,
        True,
    ),
    Option("SECRET_KEY", None, _as_str, "Flask secret key; signs the visitor cookie.", True, True),
    Option(
        "SECRET_KEY_FALLBACKS",
        "",
        _list,
        "Old secret keys (comma-separated) still accepted for cookies, for rotation.",
        secret=True,
    ),
    Option(
        "CHATKIT_BACKEND",
        "server",
        _choice("hosted", "server"),
        "server: serve the ChatKit protocol here with an Agents SDK agent; hosted: mint client "
        "secrets for an Agent Builder workflow (shut down 2026-11-30). Unset: server, or hosted "
        "when CHATKIT_WORKFLOW_ID is set.",
    ),
    Option(
        "CHATKIT_WORKFLOW_ID",
        None,
        _token,
        "Hosted mode: Agent Builder workflow id (wf_...); required there, and it implies "
        "hosted mode when CHATKIT_BACKEND is unset.",
    ),
    Option(
        "CHATKIT_ALLOWED_WORKFLOWS",
        "",
        _list,
        "Other workflow ids the browser may ask for (comma-separated).",
    ),
    Option(
        "CHATKIT_WORKFLOW_VERSION",
        None,
        _workflow_version,
        "Workflow version to run; empty runs the latest deployed version.",
    ),
    Option("CHATKIT_API_BASE", "https://api.openai.com", _http_url, "Base URL of the ChatKit API."),
    Option("CHATKIT_URL_PREFIX", "/api/chatkit", _prefix, "URL prefix of the endpoint."),
    Option(
        "CHATKIT_DOMAIN_KEY",
        "",
        _token,
        "Server mode: chatkit-js domainKey the page gets from GET {prefix}/config (OpenAI "
        "platform settings, Security, Domain allowlist); empty: a placeholder (fine on localhost).",
    ),
    Option("CHATKIT_SESSION_TTL", 600, _int_range(1, 600), "Session lifetime in seconds (1-600)."),
    Option(
        "CHATKIT_UPSTREAM_TIMEOUT",
        15,
        _float_range(0, 120),
        "Total deadline in seconds for the upstream call, retries included.",
    ),
    Option(
        "CHATKIT_UPSTREAM_RETRIES",
        2,
        _int_range(0, 5),
        "Retries on connection errors and 502/503/504, within the deadline.",
    ),
    Option(
        "CHATKIT_BREAKER_FAILURES",
        5,
        _int_range(0, 1000),
        "Consecutive upstream failures (connection, timeout, 5xx) that open the circuit; 0: off.",
    ),
    Option(
        "CHATKIT_BREAKER_COOLDOWN",
        10,
        _float_range(0, 3600),
        "Seconds an open circuit answers 503 at once before one trial request goes through.",
    ),
    Option(
        "CHATKIT_SESSION_RATE_LIMIT",
        None,
        _int_range(1, None),
        "Upstream rate_limits.max_requests_per_1_minute per session (empty: upstream default).",
    ),
    Option(
        "CHATKIT_FILE_UPLOAD_ENABLED",
        None,
        _bool,
        "chatkit_configuration.file_upload.enabled (empty: upstream default, off).",
    ),
    Option(
        "CHATKIT_FILE_UPLOAD_MAX_FILES",
        None,
        _int_range(1, None),
        "chatkit_configuration.file_upload.max_files.",
    ),
    Option(
        "CHATKIT_FILE_UPLOAD_MAX_FILE_SIZE",
        None,
        _int_range(1, 512),
        "chatkit_configuration.file_upload.max_file_size in MB (1-512).",
    ),
    Option(
        "CHATKIT_HISTORY_ENABLED",
        None,
        _bool,
        "chatkit_configuration.history.enabled (empty: upstream default, on).",
    ),
    Option(
        "CHATKIT_HISTORY_RECENT_THREADS",
        None,
        _int_range(1, None),
        "chatkit_configuration.history.recent_threads.",
    ),
    Option(
        "CHATKIT_THREAD_TITLING_ENABLED",
        None,
        _bool,
        "chatkit_configuration.automatic_thread_titling.enabled.",
    ),
    Option(
        "CHATKIT_COOKIE_NAME",
        "chatkit_session_id",
        _token,
        "Name of the visitor cookie; sent as __Host-<name> while CHATKIT_COOKIE_SECURE is true.",
    ),
    Option(
        "CHATKIT_COOKIE_SECURE",
        True,
        _bool,
        "Send the cookie only over HTTPS, with the __Host- prefix; set false for plain-HTTP "
        "development (plain name).",
    ),
    Option(
        "CHATKIT_COOKIE_MAX_AGE",
        2592000,
        _int_range(60, None),
        "Visitor cookie lifetime in seconds (default 30 days).",
    ),
    Option(
        "CHATKIT_RATELIMIT_PER_USER",
        "10 per minute;100 per day",
        _limit,
        "Per visitor or signed-in user: messages in server mode, mints in hosted mode; 'off' "
        "turns it off, empty means the default.",
    ),
    Option(
        "CHATKIT_RATELIMIT_PER_IP",
        "30 per minute;200 per day",
        _limit,
        "Per client IP (IPv6: per prefix, see CHATKIT_IPV6_PREFIX): messages in server mode, "
        "mints in hosted mode; 'off' turns it off.",
    ),
    Option(
        "CHATKIT_RATELIMIT_PER_IPV6_48",
        "60 per minute;200 per day",
        _limit,
        "Per IPv6 /48 (all its /64s together; IPv4 clients are not counted): messages in server "
        "mode, mints in hosted mode; 'off' turns it off.",
    ),
    Option(
        "CHATKIT_RATELIMIT_GLOBAL",
        "2000 per day",
        _limit,
        "Site-wide cap, a ceiling on the day's model spend: messages in server mode, mints in "
        "hosted mode; 'off': none.",
    ),
    Option(
        "CHATKIT_REDIS_TIMEOUT",
        0.3,
        _float_range(0, 10),
        "Connect and read timeout in seconds for the limiter's Redis.",
    ),
    Option(
        "CHATKIT_TRUSTED_PROXIES",
        0,
        _int_range(0, 10),
        "Number of reverse proxies in front whose X-Forwarded-For is trusted.",
    ),
    Option(
        "CHATKIT_TRUSTED_PROXY_NETWORKS",
        "127.0.0.0/8,::1/128",
        _networks,
        "Networks (CIDRs) the trusted proxies connect from; forwarded headers from any other "
        "address are ignored.",
    ),
    Option(
        "CHATKIT_IPV6_PREFIX",
        64,
        _int_range(1, 128),
        "IPv6 clients are limited per network of this prefix length.",
    ),
    Option(
        "CHATKIT_ALLOWED_ORIGINS",
        "",
        _origins,
        "Origins allowed to call cross-origin, with CORS (comma-separated).",
    ),
    Option(
        "CHATKIT_LOG_LEVEL",
        "INFO",
        _choice("debug", "info", "warning", "error"),
        "Log level of the package's loggers (standalone service; a host app sets the "
        "chatkit_flask logger's level).",
    ),
    Option(
        "CHATKIT_LOG_FORMAT",
        "text",
        _choice("text", "json"),
        "Log line format of every logger, gunicorn's included (standalone service only).",
    ),
    Option("CHATKIT_DEMO", False, _bool, "Serve the demo chat page at / (standalone service)."),
    Option(
        "CHATKIT_METRICS_ENABLED",
        False,
        _bool,
        "Serve Prometheus metrics at /metrics (the standalone service defaults to true).",
    ),
    Option(
        "CHATKIT_METRICS_ALLOW",
        "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16",
        _networks,
        "Networks (comma-separated CIDRs) allowed to read /metrics; others get 403.",
    ),
    # Server mode (CHATKIT_BACKEND=server).
    Option(
        "CHATKIT_AGENT",
        None,
        _agent_spec,
        "Server mode: package.module:name of an Agents SDK Agent, or of a callable returning one "
        "per request; unset builds a plain agent from the two keys below.",
    ),
    Option("CHATKIT_AGENT_MODEL", "gpt-4.1-mini", _token, "Server mode: the plain agent's model."),
    Option(
        "CHATKIT_AGENT_INSTRUCTIONS",
        "@instructions.md",
        _as_str,
        "Server mode: the plain agent's instructions, inline or @file (looked up in the app's "
        "instance folder, the service's config/, then the package's default).",
    ),
    Option(
        "CHATKIT_TITLE_MODEL",
        "",
        _title_model,
        "Server mode: the model that titles a thread after its first answer (a short call, "
        "charged to the visitor's tokens); empty: the agent's model; off: titles are the start "
        "of the first message.",
    ),
    Option(
        "CHATKIT_TRANSCRIBE_MODEL",
        "off",
        _model_or_off,
        "Server mode: dictation (the composer's microphone) transcribes with this OpenAI model, "
        "e.g. gpt-4o-mini-transcribe, each recording counted as a message and its tokens "
        "reserved before the call and charged; off: dictation requests are refused (400).",
    ),
    Option(
        "CHATKIT_TRANSCRIBE_MAX_BYTES",
        3_000_000,
        _int_range(1000, 25_000_000),
        "Server mode: largest dictation recording in bytes (larger: 413 before the model); "
        "it also bounds a recording's length (3 MB: about 3 to 12 minutes).",
    ),
    Option(
        "CHATKIT_HISTORY_ITEMS",
        30,
        _int_range(1, 500),
        "Server mode: thread items (newest) sent to the model with each message.",
    ),
    Option(
        "CHATKIT_HISTORY_MAX_CHARS",
        32000,
        _int_range(1000, 1_000_000),
        "Server mode: most characters of thread items (their JSON, newest first, the new "
        "message included) sent to the model; older items beyond it are left out.",
    ),
    Option(
        "CHATKIT_MAX_OUTPUT_TOKENS",
        1024,
        _int_range(16, 128_000),
        "Server mode: max_output_tokens sent with every model call (an agent's own lower "
        "max_tokens is kept); a reply that reaches it ends with a note.",
    ),
    Option(
        "CHATKIT_AGENT_MAX_TURNS",
        4,
        _int_range(1, 50),
        "Server mode: most model calls one message may make (an agent with tools loops); "
        "more ends the reply with an error.",
    ),
    Option(
        "OPENAI_BASE_URL",
        None,
        _openai_base_url,
        "Server mode: the Responses API base URL (the openai client's own variable).",
    ),
    Option(
        "CHATKIT_AGENT_TRACING",
        False,
        _bool,
        "Server mode: send Agents SDK traces to OpenAI (off: nothing leaves but the model call).",
    ),
    Option(
        "CHATKIT_MODEL_TIMEOUT",
        120,
        _float_range(0, 3600),
        "Server mode: longest silence in seconds while waiting for the model (connect and "
        "each read) before the reply ends with an error.",
    ),
    Option(
        "CHATKIT_REPLY_TIMEOUT",
        180,
        _float_range(1, 3600),
        "Server mode: total seconds one reply may take; then the model call is aborted, the "
        "partial answer kept and the visitor told.",
    ),
    Option(
        "CHATKIT_STORE_URL",
        None,
        _store_url,
        "Server mode: where threads live: sqlite:///path (one host), redis://host/db "
        "(several hosts; keys must not be evicted) or postgresql+psycopg://user@host/db (the "
        "site's database; tables from `flask chatkit db upgrade`). Unset: chatkit-threads.db "
        "in the app's instance folder (the service: var/; docker-compose.yml: the chat_data "
        "volume).",
    ),
    Option(
        "CHATKIT_STORE_TABLE_PREFIX",
        "chatkit_",
        _table_prefix,
        "Server mode, SQL store: the prefix of its table names (threads, items, attachments and "
        "the migrations' alembic_version), so they sit beside the site's own tables.",
    ),
    Option(
        "CHATKIT_STORE_BIND",
        None,
        _token,
        "Server mode, SQL store handed a Flask-SQLAlchemy object (ChatKit(app, store_engine=db)):"
        " the bind key of the engine to use; unset: its default engine.",
    ),
    Option(
        "CHATKIT_STORE_POOL_SIZE",
        5,
        _int_range(1, 100),
        "Server mode, SQL store: database connections per worker process (as many again on "
        "bursts); with pool_pre_ping, a connection the database closed is replaced.",
    ),
    Option(
        "CHATKIT_STORE_TIMEOUT",
        10,
        _float_range(0.5, 300),
        "Server mode, SQL store: seconds one statement may take (PostgreSQL statement_timeout) "
        "and to connect; a whole operation gives up after twice that.",
    ),
    Option(
        "CHATKIT_STORE_REQUIRE_PERSISTENCE",
        False,
        _bool,
        "Server mode, Redis store: refuse to start when its Redis would lose threads (no AOF or "
        "RDB, or a maxmemory-policy that evicts); false: a warning at start-up.",
    ),
    Option(
        "CHATKIT_THREAD_TTL",
        2592000,
        _int_range(60, None),
        "Server mode: seconds a thread is kept after its last write (default 30 days).",
    ),
    Option(
        "CHATKIT_ATTACHMENTS",
        False,
        _bool,
        "Server mode: visitors may attach files (images and PDFs by default) to messages; the "
        "model sees them. See docs/attachments.md.",
    ),
    Option(
        "CHATKIT_FILES_URL",
        None,
        _files_url,
        "Server mode, attachments: where their bytes live: file:///path or s3://bucket/prefix "
        "(credentials from the AWS_* variables). Unset: chatkit-files in the instance folder.",
    ),
    Option(
        "CHATKIT_S3_ENDPOINT_URL",
        None,
        _endpoint_url,
        "Server mode, attachments: the S3-compatible service's URL (MinIO, R2, ...); unset: AWS.",
    ),
    Option(
        "CHATKIT_ATTACHMENT_MAX_BYTES",
        5 * 1024 * 1024,
        _int_range(1, 100 * 1024 * 1024),
        "Server mode: largest attachment in bytes (default 5 MiB).",
    ),
    Option(
        "CHATKIT_ATTACHMENT_DAILY_BYTES",
        50 * 1024 * 1024,
        _int_range(0, None),
        "Server mode: bytes one visitor or user may upload per day, counted in the limiter's "
        "storage (default 50 MiB; 0: no daily total).",
    ),
    Option(
        "CHATKIT_ATTACHMENT_TYPES",
        "image/png,image/jpeg,image/gif,image/webp,application/pdf",
        _attachment_types,
        "Server mode: MIME types an attachment may have, checked against the file's content.",
    ),
    Option(
        "CHATKIT_ATTACHMENT_UPLOAD_TTL",
        300,
        _int_range(10, 86_400),
        "Server mode: seconds an upload URL stays valid (each works once).",
    ),
    Option(
        "CHATKIT_ATTACHMENTS_PER_MESSAGE",
        4,
        _int_range(1, 20),
        "Server mode: attachments one message may carry.",
    ),
    Option(
        "CHATKIT_RATELIMIT_REQUESTS_PER_IP",
        "300 per minute",
        _limit,
        "Server mode: all ChatKit requests per client IP, reads included ('off': none).",
    ),
    Option(
        "CHATKIT_TOKENS_PER_USER",
        "off",
        _limit,
        "Server mode: model tokens (in + out) per visitor or user, e.g. '200000 per day'; a "
        "visitor over it is refused like the message limit ('off': no budget).",
    ),
    Option(
        "CHATKIT_TOKENS_GLOBAL",
        "off",
        _limit,
        "Server mode: model tokens (in + out) for the whole site, e.g. '5000000 per day'.",
    ),
    Option(
        "CHATKIT_MAX_STREAMS_PER_USER",
        2,
        _int_range(1, 100),
        "Server mode: replies one visitor or user may have streaming at once.",
    ),
    Option(
        "CHATKIT_MAX_STREAMS_PER_IP",
        10,
        _int_range(1, 100_000),
        "Server mode: replies streaming at once to one client network (IPv4 address, IPv6 "
        "network of CHATKIT_IPV6_PREFIX bits), across workers and hosts.",
    ),
    Option(
        "CHATKIT_MAX_STREAMS_PER_WORKER",
        0,
        _int_range(0, 100_000),
        "Server mode: replies one worker process streams at once; 0 = no cap. "
        "config/gunicorn.conf.py sets 500 when unset (server mode's worker; under gthread, where "
        "each reply holds a thread, GUNICORN_THREADS - 8): the instance holds workers x that many.",
    ),
    Option(
        "CHATKIT_STREAM_SLOT_LEASE",
        30,
        _float_range(3, 600),
        "Server mode: seconds a reply's stream slot outlives its last renewal (a streaming reply "
        "renews it every third of this); after a worker dies its visitors wait at most this long.",
    ),
    Option(
        "CHATKIT_STREAM_WRITE_TIMEOUT",
        20,
        _float_range(1, 600),
        "Server mode: seconds a reply may wait on a client that does not read before it is "
        "dropped (the model call aborted, the thread and the slot freed).",
    ),
    Option(
        "CHATKIT_MAX_INPUT_CHARS",
        4000,
        _int_range(1, 100_000),
        "Server mode: longest user message in characters (longer: 400 before the model).",
    ),
    Option(
        "CHATKIT_CLIENT_TOOL_MAX_CHARS",
        8000,
        _int_range(1, 100_000),
        "Server mode: longest client tool output (the browser's result for a client tool "
        "call, as JSON) in characters (longer: 400 tool_output_too_large before the model).",
    ),
    Option(
        "CHATKIT_HOST_DEFAULT_LIMITS",
        False,
        _bool,
        "true: a handed-over limiter's default limits count the chat's routes too (by default "
        "only the chat's own limits and the host's application limits do).",
    ),
    Option(
        "CHATKIT_FORGET_VISITOR_ON_LOGOUT",
        True,
        _bool,
        "With Flask-Login: log-out drops the anonymous visitor cookie, so the next person at "
        "the computer does not see that visitor's threads.",
    ),
    Option(
        "CHATKIT_ADOPT_VISITOR_THREADS",
        False,
        _bool,
        "Server mode: at log-in the anonymous visitor's threads move to the account (with "
        "Flask-Login automatically, else chatkit.adopt_visitor_threads()).",
    ),
    # Flask-Limiter's own keys, with its defaults; validated here, read by Flask-Limiter.
    Option("RATELIMIT_ENABLED", True, _bool, "Flask-Limiter: false turns every limit off."),
    Option(
        "RATELIMIT_STORAGE_URI",
        "memory://",
        _storage_uri,
        "Flask-Limiter storage: redis://, rediss://, redis+sentinel://, redis+cluster://, "
        "valkey://; memory:// counts per process.",
    ),
    Option(
        "RATELIMIT_STRATEGY",
        "fixed-window",
        _choice("fixed-window", "moving-window", "sliding-window-counter"),
        "Flask-Limiter strategy.",
    ),
    Option(
        "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED",
        False,
        _bool,
        "Flask-Limiter: per-process in-memory limits while the storage is down (else 503).",
    ),
    Option(
        "RATELIMIT_SWALLOW_ERRORS",
        False,
        _bool,
        "Flask-Limiter: let requests through unlimited while the storage fails (fail open).",
    ),
    Option("RATELIMIT_HEADERS_ENABLED", False, _bool, "Flask-Limiter: send X-RateLimit-* headers."),
    Option("RATELIMIT_KEY_PREFIX", "", _key_prefix, "Flask-Limiter: prefix of its storage keys."),
]

OPTIONS: dict[str, Option] = {option.name: option for option in _OPTION_LIST}

# Which backend reads a key (any other key serves both): the README's table and `flask chatkit
# check` show the required keys and server mode's first, hosted mode's last.
_HOSTED_KEYS = frozenset(
    {
        "CHATKIT_WORKFLOW_ID",
        "CHATKIT_ALLOWED_WORKFLOWS",
        "CHATKIT_WORKFLOW_VERSION",
        "CHATKIT_API_BASE",
        "CHATKIT_SESSION_TTL",
        "CHATKIT_UPSTREAM_TIMEOUT",
        "CHATKIT_UPSTREAM_RETRIES",
        "CHATKIT_BREAKER_FAILURES",
        "CHATKIT_BREAKER_COOLDOWN",
        "CHATKIT_SESSION_RATE_LIMIT",
        "CHATKIT_FILE_UPLOAD_ENABLED",
        "CHATKIT_FILE_UPLOAD_MAX_FILES",
        "CHATKIT_FILE_UPLOAD_MAX_FILE_SIZE",
        "CHATKIT_HISTORY_ENABLED",
        "CHATKIT_HISTORY_RECENT_THREADS",
        "CHATKIT_THREAD_TITLING_ENABLED",
    }
)
_SERVER_KEYS = frozenset(
    {
        "CHATKIT_DOMAIN_KEY",
        "CHATKIT_AGENT",
        "CHATKIT_AGENT_MODEL",
        "CHATKIT_AGENT_INSTRUCTIONS",
        "CHATKIT_TITLE_MODEL",
        "CHATKIT_TRANSCRIBE_MODEL",
        "CHATKIT_TRANSCRIBE_MAX_BYTES",
        "CHATKIT_HISTORY_ITEMS",
        "OPENAI_BASE_URL",
        "CHATKIT_AGENT_TRACING",
        "CHATKIT_MODEL_TIMEOUT",
        "CHATKIT_STORE_URL",
        "CHATKIT_THREAD_TTL",
        "CHATKIT_RATELIMIT_REQUESTS_PER_IP",
        "CHATKIT_TOKENS_PER_USER",
        "CHATKIT_TOKENS_GLOBAL",
        "CHATKIT_MAX_STREAMS_PER_USER",
        "CHATKIT_MAX_INPUT_CHARS",
        "CHATKIT_CLIENT_TOOL_MAX_CHARS",
        "CHATKIT_HISTORY_MAX_CHARS",
        "CHATKIT_MAX_OUTPUT_TOKENS",
        "CHATKIT_AGENT_MAX_TURNS",
        "CHATKIT_REPLY_TIMEOUT",
        "CHATKIT_STORE_REQUIRE_PERSISTENCE",
        "CHATKIT_STORE_TABLE_PREFIX",
        "CHATKIT_STORE_BIND",
        "CHATKIT_STORE_POOL_SIZE",
        "CHATKIT_STORE_TIMEOUT",
        "CHATKIT_MAX_STREAMS_PER_IP",
        "CHATKIT_MAX_STREAMS_PER_WORKER",
        "CHATKIT_STREAM_SLOT_LEASE",
        "CHATKIT_STREAM_WRITE_TIMEOUT",
        "CHATKIT_ADOPT_VISITOR_THREADS",
        "CHATKIT_ATTACHMENTS",
        "CHATKIT_FILES_URL",
        "CHATKIT_S3_ENDPOINT_URL",
        "CHATKIT_ATTACHMENT_MAX_BYTES",
        "CHATKIT_ATTACHMENT_DAILY_BYTES",
        "CHATKIT_ATTACHMENT_TYPES",
        "CHATKIT_ATTACHMENT_UPLOAD_TTL",
        "CHATKIT_ATTACHMENTS_PER_MESSAGE",
    }
)


def backend_of(name: str) -> str:
    """``"server"`` or ``"hosted"`` for a key only that backend reads, ``""`` for a shared one."""
    return "hosted" if name in _HOSTED_KEYS else "server" if name in _SERVER_KEYS else ""


def options_in_reading_order() -> list[Option]:
    """Every option, as a newcomer should meet them: the required keys and CHATKIT_BACKEND,
    then server mode's keys, the shared ones, and hosted mode's last."""
    rank = {"server": 1, "": 2, "hosted": 3}

    def place(option: Option) -> int:
        first = option.required or option.name == "CHATKIT_BACKEND"
        return 0 if first else rank[backend_of(option.name)]

    return sorted(OPTIONS.values(), key=place)  # stable: file order within a group


def _read(config: Mapping[str, Any], name: str) -> Any:
    option = OPTIONS[name]
    raw = config.get(name, option.default)
    if _blank(raw):
        if option.required:
            raise ConfigError(name, "is required but not set")
        raw = option.default
        if _blank(raw):
            return None if option.parse is not _list and option.parse is not _origins else ()
    return option.parse(name, raw)


@dataclass(frozen=True)
class Settings:
    """The validated configuration the extension runs with."""

    backend: str
    backend_reason: str
    api_key: str
    secret_key: str
    secret_key_fallbacks: tuple[str, ...]
    workflow_id: str | None
    allowed_workflows: frozenset[str]
    workflow_version: str | None
    api_base: str
    url_prefix: str
    domain_key: str
    session_ttl: int
    upstream_timeout: float
    upstream_retries: int
    breaker_failures: int
    breaker_cooldown: float
    session_rate_limit: int | None
    chatkit_configuration: dict[str, Any] | None
    cookie_name: str
    cookie_secure: bool
    cookie_max_age: int
    limit_per_user: str
    limit_per_ip: str
    limit_per_ipv6_48: str
    limit_global: str
    redis_timeout: float
    trusted_proxies: int
    trusted_proxy_networks: tuple[str, ...]
    ipv6_prefix: int
    allowed_origins: tuple[str, ...]
    log_level: str
    log_format: str
    demo: bool
    metrics_enabled: bool
    metrics_allow: tuple[str, ...]
    agent: str | None
    agent_model: str
    agent_instructions: str
    title_model: str
    transcribe_model: str
    transcribe_max_bytes: int
    history_items: int
    history_max_chars: int
    max_output_tokens: int
    agent_max_turns: int
    openai_base_url: str | None
    agent_tracing: bool
    model_timeout: float
    reply_timeout: float
    store_url: str | None
    store_require_persistence: bool
    store_table_prefix: str
    store_bind: str | None
    store_pool_size: int
    store_timeout: float
    stream_slot_lease: float
    max_streams_per_ip: int
    max_streams_per_worker: int
    stream_write_timeout: float
    thread_ttl: int
    attachments: bool
    files_url: str | None
    s3_endpoint_url: str | None
    attachment_max_bytes: int
    attachment_daily_bytes: int
    attachment_types: tuple[str, ...]
    attachment_upload_ttl: int
    attachments_per_message: int
    limit_requests_per_ip: str
    tokens_per_user: str
    tokens_global: str
    max_streams_per_user: int
    max_input_chars: int
    client_tool_max_chars: int
    host_default_limits: bool
    forget_visitor_on_logout: bool
    adopt_visitor_threads: bool
    ratelimit_enabled: bool
    storage_uri: str
    strategy: str
    in_memory_fallback: bool
    swallow_errors: bool
    headers_enabled: bool
    key_prefix: str

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> Settings:
        """Parse and check ``config`` (a Flask ``app.config`` or any mapping of key to value)."""
        v = {name: _read(config, name) for name in OPTIONS}
        backend, backend_reason = _choose_backend(config, v)
        v["CHATKIT_BACKEND"] = backend
        _check_secret_key(v["SECRET_KEY"], config)
        if v["CHATKIT_COOKIE_NAME"].startswith(("__Host-", "__Secure-")) and not v[
            "CHATKIT_COOKIE_SECURE"
        ]:
            raise ConfigError(
                "CHATKIT_COOKIE_NAME",
                "a __Host- or __Secure- name needs CHATKIT_COOKIE_SECURE=true (browsers drop "
                "such a cookie without Secure)",
            )
        allowed = set(v["CHATKIT_ALLOWED_WORKFLOWS"])
        for workflow in allowed:
            _token("CHATKIT_ALLOWED_WORKFLOWS", workflow)
        if v["CHATKIT_WORKFLOW_ID"]:
            allowed.add(v["CHATKIT_WORKFLOW_ID"])
        elif v["CHATKIT_BACKEND"] == "hosted":
            raise ConfigError(
                "CHATKIT_WORKFLOW_ID", "is required but not set (or set CHATKIT_BACKEND=server)"
            )
        if v["CHATKIT_HISTORY_MAX_CHARS"] < v["CHATKIT_MAX_INPUT_CHARS"] + 1000:
            raise ConfigError(
                "CHATKIT_HISTORY_MAX_CHARS",
                "must hold the longest message: at least CHATKIT_MAX_INPUT_CHARS + 1000 "
                f"({v['CHATKIT_MAX_INPUT_CHARS'] + 1000})",
            )
        daily = v["CHATKIT_ATTACHMENT_DAILY_BYTES"]
        if daily and daily < v["CHATKIT_ATTACHMENT_MAX_BYTES"]:
            raise ConfigError(
                "CHATKIT_ATTACHMENT_DAILY_BYTES",
                f"must hold one file: at least CHATKIT_ATTACHMENT_MAX_BYTES "
                f"({v['CHATKIT_ATTACHMENT_MAX_BYTES']}), or 0 for no daily total",
            )
        fallbacks = config.get("SECRET_KEY_FALLBACKS") or ()
        if isinstance(fallbacks, str):
            fallbacks = _list("SECRET_KEY_FALLBACKS", fallbacks)
        return cls(
            backend=backend,
            backend_reason=backend_reason,
            api_key=v["OPENAI_API_KEY"],
            secret_key=v["SECRET_KEY"],
            secret_key_fallbacks=tuple(str(key) for key in fallbacks),
            workflow_id=v["CHATKIT_WORKFLOW_ID"],
            allowed_workflows=frozenset(allowed),
            workflow_version=v["CHATKIT_WORKFLOW_VERSION"],
            api_base=v["CHATKIT_API_BASE"],
            url_prefix=v["CHATKIT_URL_PREFIX"],
            domain_key=v["CHATKIT_DOMAIN_KEY"] or "",
            session_ttl=v["CHATKIT_SESSION_TTL"],
            upstream_timeout=v["CHATKIT_UPSTREAM_TIMEOUT"],
            upstream_retries=v["CHATKIT_UPSTREAM_RETRIES"],
            breaker_failures=v["CHATKIT_BREAKER_FAILURES"],
            breaker_cooldown=v["CHATKIT_BREAKER_COOLDOWN"],
            session_rate_limit=v["CHATKIT_SESSION_RATE_LIMIT"],
            chatkit_configuration=_chatkit_configuration(v),
            cookie_name=v["CHATKIT_COOKIE_NAME"],
            cookie_secure=v["CHATKIT_COOKIE_SECURE"],
            cookie_max_age=v["CHATKIT_COOKIE_MAX_AGE"],
            limit_per_user=v["CHATKIT_RATELIMIT_PER_USER"] or "",
            limit_per_ip=v["CHATKIT_RATELIMIT_PER_IP"] or "",
            limit_per_ipv6_48=v["CHATKIT_RATELIMIT_PER_IPV6_48"] or "",
            limit_global=v["CHATKIT_RATELIMIT_GLOBAL"] or "",
            redis_timeout=v["CHATKIT_REDIS_TIMEOUT"],
            trusted_proxies=v["CHATKIT_TRUSTED_PROXIES"],
            trusted_proxy_networks=v["CHATKIT_TRUSTED_PROXY_NETWORKS"],
            ipv6_prefix=v["CHATKIT_IPV6_PREFIX"],
            allowed_origins=v["CHATKIT_ALLOWED_ORIGINS"],
            log_level=v["CHATKIT_LOG_LEVEL"].upper(),
            log_format=v["CHATKIT_LOG_FORMAT"],
            demo=v["CHATKIT_DEMO"],
            metrics_enabled=v["CHATKIT_METRICS_ENABLED"],
            metrics_allow=v["CHATKIT_METRICS_ALLOW"],
            agent=v["CHATKIT_AGENT"],
            agent_model=v["CHATKIT_AGENT_MODEL"],
            agent_instructions=v["CHATKIT_AGENT_INSTRUCTIONS"],
            title_model=v["CHATKIT_TITLE_MODEL"],
            transcribe_model=v["CHATKIT_TRANSCRIBE_MODEL"],
            transcribe_max_bytes=v["CHATKIT_TRANSCRIBE_MAX_BYTES"],
            history_items=v["CHATKIT_HISTORY_ITEMS"],
            history_max_chars=v["CHATKIT_HISTORY_MAX_CHARS"],
            max_output_tokens=v["CHATKIT_MAX_OUTPUT_TOKENS"],
            agent_max_turns=v["CHATKIT_AGENT_MAX_TURNS"],
            openai_base_url=v["OPENAI_BASE_URL"],
            agent_tracing=v["CHATKIT_AGENT_TRACING"],
            model_timeout=v["CHATKIT_MODEL_TIMEOUT"],
            reply_timeout=v["CHATKIT_REPLY_TIMEOUT"],
            store_url=v["CHATKIT_STORE_URL"],
            store_require_persistence=v["CHATKIT_STORE_REQUIRE_PERSISTENCE"],
            store_table_prefix=v["CHATKIT_STORE_TABLE_PREFIX"],
            store_bind=v["CHATKIT_STORE_BIND"],
            store_pool_size=v["CHATKIT_STORE_POOL_SIZE"],
            store_timeout=v["CHATKIT_STORE_TIMEOUT"],
            stream_slot_lease=v["CHATKIT_STREAM_SLOT_LEASE"],
            max_streams_per_ip=v["CHATKIT_MAX_STREAMS_PER_IP"],
            max_streams_per_worker=v["CHATKIT_MAX_STREAMS_PER_WORKER"],
            stream_write_timeout=v["CHATKIT_STREAM_WRITE_TIMEOUT"],
            thread_ttl=v["CHATKIT_THREAD_TTL"],
            attachments=v["CHATKIT_ATTACHMENTS"],
            files_url=v["CHATKIT_FILES_URL"],
            s3_endpoint_url=v["CHATKIT_S3_ENDPOINT_URL"],
            attachment_max_bytes=v["CHATKIT_ATTACHMENT_MAX_BYTES"],
            attachment_daily_bytes=v["CHATKIT_ATTACHMENT_DAILY_BYTES"],
            attachment_types=v["CHATKIT_ATTACHMENT_TYPES"],
            attachment_upload_ttl=v["CHATKIT_ATTACHMENT_UPLOAD_TTL"],
            attachments_per_message=v["CHATKIT_ATTACHMENTS_PER_MESSAGE"],
            limit_requests_per_ip=v["CHATKIT_RATELIMIT_REQUESTS_PER_IP"] or "",
            tokens_per_user=v["CHATKIT_TOKENS_PER_USER"] or "",
            tokens_global=v["CHATKIT_TOKENS_GLOBAL"] or "",
            max_streams_per_user=v["CHATKIT_MAX_STREAMS_PER_USER"],
            max_input_chars=v["CHATKIT_MAX_INPUT_CHARS"],
            client_tool_max_chars=v["CHATKIT_CLIENT_TOOL_MAX_CHARS"],
            host_default_limits=v["CHATKIT_HOST_DEFAULT_LIMITS"],
            forget_visitor_on_logout=v["CHATKIT_FORGET_VISITOR_ON_LOGOUT"],
            adopt_visitor_threads=v["CHATKIT_ADOPT_VISITOR_THREADS"],
            ratelimit_enabled=v["RATELIMIT_ENABLED"],
            storage_uri=v["RATELIMIT_STORAGE_URI"],
            strategy=v["RATELIMIT_STRATEGY"],
            in_memory_fallback=v["RATELIMIT_IN_MEMORY_FALLBACK_ENABLED"],
            swallow_errors=v["RATELIMIT_SWALLOW_ERRORS"],
            headers_enabled=v["RATELIMIT_HEADERS_ENABLED"],
            key_prefix=v["RATELIMIT_KEY_PREFIX"] or "",
        )


def _choose_backend(config: Mapping[str, Any], v: Mapping[str, Any]) -> tuple[str, str]:
    """The backend and why, for the start-up log line. A workflow id with no backend named keeps
    a hosted site that predates server mode (it never set CHATKIT_BACKEND) on hosted mode."""
    if not _blank(config.get("CHATKIT_BACKEND")):
        return v["CHATKIT_BACKEND"], "CHATKIT_BACKEND is set"
    if v["CHATKIT_WORKFLOW_ID"]:
        return "hosted", "CHATKIT_BACKEND is unset and CHATKIT_WORKFLOW_ID is set"
    return "server", "the default: CHATKIT_BACKEND and CHATKIT_WORKFLOW_ID are unset"


def _chatkit_configuration(v: Mapping[str, Any]) -> dict[str, Any] | None:
    """Build the upstream ``chatkit_configuration`` from the keys that are set, or None."""
    sections: dict[str, dict[str, Any]] = {}

    def put(section: str, field: str, key: str) -> None:
        if v[key] is not None:
            sections.setdefault(section, {})[field] = v[key]

    put("file_upload", "enabled", "CHATKIT_FILE_UPLOAD_ENABLED")
    put("file_upload", "max_files", "CHATKIT_FILE_UPLOAD_MAX_FILES")
    put("file_upload", "max_file_size", "CHATKIT_FILE_UPLOAD_MAX_FILE_SIZE")
    put("history", "enabled", "CHATKIT_HISTORY_ENABLED")
    put("history", "recent_threads", "CHATKIT_HISTORY_RECENT_THREADS")
    put("automatic_thread_titling", "enabled", "CHATKIT_THREAD_TITLING_ENABLED")
    return sections or None


# Variables with our prefixes that are not settings but are read elsewhere (the service's
# file locations, gunicorn.conf.py's bookkeeping, the reverse proxy's host name, which Compose
# passes from the same .env; the test and benchmark tools).
_NOT_SETTINGS = frozenset(
    {"CHATKIT_CONFIG_FILE", "CHATKIT_ENV_FILE", "CHATKIT_GUNICORN_METRICS_DIR", "CHATKIT_SITE_HOST"}
)
_TOOL_PREFIXES = ("CHATKIT_TEST_", "CHATKIT_BENCH_", "CHATKIT_UPDATE_")
_settings_log = logging.getLogger("chatkit_flask.settings")


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``KEY=value`` pairs of a ``.env`` file, parsed as python-dotenv (and Flask's CLI) does.

    The last of duplicate keys wins, as with Docker Compose; ``export KEY=v``, spaces around
    ``=``, CRLF line ends, comments and quotes are understood; values are not expanded. A bare
    ``KEY`` line sets nothing.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError("CHATKIT_ENV_FILE", f"file not found: {file}")
    values = dotenv_values(file, interpolate=False, encoding="utf-8")
    return {key: value for key, value in values.items() if value is not None}


def _warn_unknown(names: Iterable[str], where: str) -> None:
    # A warning, not an error (unlike an unknown key in the TOML file, which is ours alone): the
    # environment and .env are shared with Compose, gunicorn and other tools, and an error
    # would stop a deploy for a variable this service never reads.
    for name in sorted(names):
        known = name in OPTIONS or name in _NOT_SETTINGS or name.startswith(_TOOL_PREFIXES)
        if name.startswith(("CHATKIT_", "RATELIMIT_")) and not known:
            _settings_log.warning("%s in %s is not a setting of this service; ignored", name, where)


def load_config(
    path: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Read the operator's TOML file, then ``env_file`` (a ``.env``), then let environment
    variables win, as Docker Compose does.

    Unknown keys in the file stop start-up (a typo would otherwise be silently ignored); an
    unknown ``CHATKIT_*`` or ``RATELIMIT_*`` variable in the environment or ``.env`` is logged
    as a warning naming it.
    """
    environ = os.environ if environ is None else environ
    _warn_unknown(environ, "the environment")
    if env_file is not None:
        from_file = read_env_file(env_file)
        _warn_unknown(from_file.keys() - environ.keys(), str(env_file))
        environ = {**from_file, **environ}
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            with file.open("rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError("CHATKIT_CONFIG_FILE", f"file not found: {file}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("CHATKIT_CONFIG_FILE", f"{file} is not valid TOML: {exc}") from None
        for key, value in data.items():
            if key not in OPTIONS:
                raise ConfigError(key, f"unknown key in {file}")
            values[key] = value
    for key in OPTIONS:
        if key in environ:
            values[key] = environ[key]
    return values


def markdown_table() -> str:
    """The configuration table of the README, generated from ``OPTIONS``."""
    rows = ["| key | backend | default | meaning |", "|---|---|---|---|"]
    for option in options_in_reading_order():
        if option.required:
            default = "**required**"
        elif _blank(option.default):
            default = "(unset)"
        elif isinstance(option.default, bool):
            default = f"`{str(option.default).lower()}`"
        else:
            default = f"`{option.default}`"
        backend = backend_of(option.name) or "both"
        rows.append(f"| `{option.name}` | {backend} | {default} | {option.help} |")
    return "\n".join(rows)
