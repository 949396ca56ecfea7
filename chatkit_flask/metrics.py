"""Prometheus metrics of the mint endpoint, and the ``/metrics`` endpoint that exposes them
(server mode's own metrics are ``chatkit_flask.server.metrics``'s, wired from here).

The metrics live in prometheus-client's default registry, so a host app that already exports
that registry gets them for free. Under gunicorn (several worker processes) set
``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable directory before the workers start: each
process then writes its values to files there and ``/metrics`` adds them up at scrape time
(``MultiProcessCollector``), whichever worker answers the scrape. The directory must be emptied
whenever gunicorn (re)starts, and ``config/gunicorn.conf.py``'s ``child_exit`` hook calls
``multiprocess.mark_process_dead`` for each dead worker.

Values are collected from the facts the view leaves on ``flask.g`` (outcome, limit scope,
upstream result), by a hook the extension's blueprint calls with each of its own responses (host
routes pay nothing); the view itself knows nothing about metrics.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

# prometheus-client picks multiprocess mode at import when the variable merely exists; an empty
# value (``PROMETHEUS_MULTIPROC_DIR=`` in an env file) would make it write to the working
# directory. Empty means unset.
if "PROMETHEUS_MULTIPROC_DIR" in os.environ and not os.environ["PROMETHEUS_MULTIPROC_DIR"].strip():
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from . import upstream as upstream_module
from .limits import fallback_active
from .metrics_dir import forget_dead_workers, under_gunicorn
from .upstream import UpstreamTimeout

if TYPE_CHECKING:
    from .state import ChatKitState

__all__ = [
    "CIRCUIT_STATES",
    "circuit_state",
    "init_metrics",
    "limiter_fallback_active",
    "limiter_storage_errors",
    "metrics_summed",
    "mints",
    "multiprocess_enabled",
    "rate_limited",
    "render_latest",
    "set_circuit_state",
    "upstream_latency",
    "upstream_responses",
]

_ENDPOINT = "chatkit.secret"
_EXTENSION_KEY = "chatkit_metrics"

# The upstream call normally takes 0.2-2 s; the deadline (CHATKIT_UPSTREAM_TIMEOUT) is 15 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0)

mints = Counter(
    "chatkit_mints",
    "Mint requests (POST .../secret) by outcome: minted or the error code answered.",
    ["outcome"],
)
rate_limited = Counter(
    "chatkit_rate_limited",
    "Mint requests refused with 429, by the limit that refused them (user, ip, global).",
    ["scope"],
)
upstream_latency = Histogram(
    "chatkit_upstream_latency_seconds",
    "Time spent on the upstream session call, retries included.",
    buckets=LATENCY_BUCKETS,
)
upstream_responses = Counter(
    "chatkit_upstream_responses",
    "Upstream session calls by final HTTP status, or 'timeout' / 'error' (no answer).",
    ["status"],
)
limiter_storage_errors = Counter(
    "chatkit_limiter_storage_errors",
    "Rate limit storage failures seen by requests (503 fail-closed, switch to the in-memory "
    "fallback, or errors swallowed fail-open).",
)
limiter_fallback_active = Gauge(
    "chatkit_limiter_fallback_active",
    "1 while a worker limits from its in-memory fallback because the storage is unreachable.",
    multiprocess_mode="livemax",
)
metrics_summed = Gauge(
    "chatkit_metrics_multiprocess",
    "1 when /metrics adds up every worker process's values (PROMETHEUS_MULTIPROC_DIR); 0 when "
    "it shows only the process that answered the scrape.",
    multiprocess_mode="max",
)
circuit_state = Gauge(
    "chatkit_upstream_circuit_state",
    "Upstream circuit breaker: 0 closed, 1 half-open, 2 open (worst live worker).",
    multiprocess_mode="livemax",
)

# Label values that should read 0 rather than be absent, so rate() and alerts work at once.
mints.labels("minted")
for _scope in ("user", "ip", "net48", "global"):
    rate_limited.labels(_scope)

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}


def set_circuit_state(state: str) -> None:
    """Record the upstream circuit breaker's state: ``closed``, ``half_open`` or ``open``."""
    try:
        value = CIRCUIT_STATES[state.lower()]
    except KeyError:
        raise ValueError(f"unknown circuit state {state!r}") from None
    circuit_state.set(value)


def multiprocess_enabled() -> bool:
    """True when prometheus-client writes values to ``PROMETHEUS_MULTIPROC_DIR`` files."""
    # prometheus-client copies the deprecated lower-case name to this one at import time.
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def render_latest() -> bytes:
    """The exposition text: summed over all worker processes in multiprocess mode."""
    if multiprocess_enabled():
        forget_dead_workers(multiprocess.mark_process_dead)
        # A fresh registry per scrape holding only the collector, as prometheus-client advises
        # (the default registry would export this process's values a second time).
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


# ------------------------------------------------------------------ collection


def _state() -> ChatKitState | None:
    return current_app.extensions.get("chatkit")


def _upstream_status(upstream: Any) -> str:
    status = getattr(upstream, "status", None)
    if status is not None:
        return str(status)
    return "timeout" if isinstance(upstream, UpstreamTimeout) else "error"


def _called(upstream: Any) -> bool:
    """False when the upstream was not called at all (the circuit breaker refused)."""
    circuit_open = getattr(upstream_module, "CircuitOpen", None)
    return not (circuit_open is not None and isinstance(upstream, circuit_open))


def _on_response(response: Response) -> None:
    try:
        _record(response)
    except Exception:  # metrics must never break a response
        logging.getLogger("chatkit_flask").exception("chatkit_flask: recording metrics failed")


def _record(response: Response) -> None:
    state = _state()
    if state is not None:
        limiter_fallback_active.set(1 if fallback_active(state.limiter) else 0)
    if g.get("chatkit_storage_failed"):
        limiter_storage_errors.inc()
    if request.endpoint != _ENDPOINT or request.method != "POST":
        return
    outcome = g.get("chatkit_outcome") or f"http_{response.status_code}"
    mints.labels(outcome).inc()
    if response.status_code == 429:
        rate_limited.labels(g.get("chatkit_limit_scope") or "user").inc()
    upstream = g.get("chatkit_upstream")
    if upstream is not None and _called(upstream):
        upstream_responses.labels(_upstream_status(upstream)).inc()
        latency_ms = getattr(upstream, "latency_ms", None)
        if latency_ms is not None:
            upstream_latency.observe(latency_ms / 1000)


# ------------------------------------------------------------------ endpoint


def _parse_networks(
    values: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def _allowed(remote_addr: str | None, networks: Iterable[Any]) -> bool:
    if not remote_addr:
        return False
    try:
        address = ipaddress.ip_address(remote_addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def _metrics_blueprint(state: ChatKitState, path: str, allow: Iterable[str]) -> Blueprint:
    networks = _parse_networks(allow)
    bp = Blueprint("chatkit_metrics", __name__)

    @bp.get(path)
    def metrics() -> Response | tuple[Response, int]:
        if not _allowed(request.remote_addr, networks):
            response = jsonify(
                error="forbidden", message="Metrics are not available from this address."
            )
            response.headers["Cache-Control"] = "no-store"
            return response, 403
        limiter_fallback_active.set(1 if fallback_active(state.limiter) else 0)
        response = Response(render_latest(), mimetype=None)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        response.headers["Cache-Control"] = "no-store"
        return response

    state.exempt(bp)
    return bp


class _StorageErrorCounter(logging.Handler):
    """Counts Flask-Limiter's storage-failure log records (it reports them only there)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "storage unreachable" in message or "Swallowing error" in message:
            limiter_storage_errors.inc()


def _count_limiter_log_errors() -> None:
    logger = logging.getLogger("flask-limiter")
    if not any(isinstance(handler, _StorageErrorCounter) for handler in logger.handlers):
        logger.addHandler(_StorageErrorCounter(logging.WARNING))


def init_metrics(
    app: Flask,
    *,
    endpoint: bool = True,
    path: str = "/metrics",
    allow: Iterable[str] | None = None,
) -> None:
    """Collect the metrics of ``app``'s backend (after ``ChatKit(app)``) and, unless
    ``endpoint`` is False, serve them at ``path`` to clients in ``allow`` (CIDRs; default
    ``CHATKIT_METRICS_ALLOW``). The service calls this when ``CHATKIT_METRICS_ENABLED`` is true.

    A host app that already exports prometheus-client's default registry can pass
    ``endpoint=False``: the metrics are registered there.
    """
    state = app.extensions.get("chatkit")
    if state is None:
        raise RuntimeError("init_metrics(app) needs ChatKit(app) first")
    if _EXTENSION_KEY in app.extensions:
        return
    app.extensions[_EXTENSION_KEY] = True
    metrics_summed.set(1 if multiprocess_enabled() else 0)
    if under_gunicorn() and not multiprocess_enabled():
        logging.getLogger("chatkit_flask").warning(
            "chatkit_flask: metrics are per worker process: /metrics shows the values of "
            "whichever gunicorn worker answers (chatkit_metrics_multiprocess 0). Run gunicorn "
            "with -c config/gunicorn.conf.py, or set PROMETHEUS_MULTIPROC_DIR to an empty "
            "writable directory, and do not use --preload."
        )
    state.response_hooks.append(_on_response)
    if state.server is not None:  # server mode: the SDKs are already imported
        from .server.metrics import init_server_metrics

        init_server_metrics(state)
    # Storage failures Flask-Limiter handles itself (the switch to its in-memory fallback,
    # errors it swallows) reach us only through its log.
    _count_limiter_log_errors()
    if endpoint:
        networks = state.settings.metrics_allow if allow is None else tuple(allow)
        app.register_blueprint(_metrics_blueprint(state, path, networks))
