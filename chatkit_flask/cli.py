"""``flask chatkit ...``: operator commands registered by the extension.

    flask --app wsgi chatkit check [--live]     configuration, limiter storage, thread store,
                                                (live) upstream or model; exit 0/2/3
    flask --app wsgi chatkit limits             every limit the chat answers to, and storage
    flask --app wsgi chatkit usage --visitor ID what is left of each limit for one key
    flask --app wsgi chatkit reset --ip ADDR    clear one key's counters
    flask --app wsgi chatkit threads|purge|prune  server mode: stored threads
    flask --app wsgi chatkit db upgrade|current   server mode, SQL store: its tables' migrations

Both backends: in server mode ``usage`` and ``reset`` cover the message and request limits,
the stream slots and the token budgets.

Nothing printed here contains the API key, the cookie-signing key, a client secret or a
storage password.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click
from flask import current_app
from flask.cli import AppGroup
from limits import RateLimitItem, parse_many

from .identity import client_network, hash_id
from .limits import STORAGE_ERRORS, counter_args, describe, storage_of
from .logs import SERVICE_ONLY_SETTINGS
from .sanitize import escape_control, mask_url, redact_credentials
from .settings import OPTIONS, ConfigError, _read, backend_of, options_in_reading_order
from .upstream import (
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from .state import ChatKitState

__all__ = ["chatkit_cli", "db_command_running", "mask_api_key", "mask_storage_uri"]

CHECK_USER = "chatkit-flask-check"

# `flask chatkit check` exit codes: a script or a deploy pipeline can tell what to do next.
EXIT_OK = 0
EXIT_MISCONFIGURED = 2  # fix the configuration (a key refused, a model or workflow not found)
EXIT_UNREACHABLE = 3  # the configuration looks right but a dependency does not answer

_CHECK_TTL = 60  # seconds: a check session that could not be cancelled expires soon anyway

chatkit_cli = AppGroup(
    "chatkit",
    help="Operate the chat: hosted mode (client secrets) and server mode (messages, stream "
    "slots, token budgets, stored threads).",
)


def _state() -> ChatKitState:
    state = current_app.extensions.get("chatkit")
    if state is None:
        raise click.ClickException("ChatKit is not registered on this app")
    return state


def mask_api_key(key: str | None) -> str:
    """``sk-...WXYZ``: the key's kind and its last 4 characters, as OpenAI's dashboard shows."""
    if not key:
        return "(not set)"
    if len(key) < 12:
        return "***"
    prefix = "sk-" if key.startswith("sk-") else ""
    return f"{prefix}...{key[-4:]}"


mask_storage_uri = mask_url  # the name this module first exported


def _shown(name: str, value: Any) -> str:
    option = OPTIONS[name]
    if name == "OPENAI_API_KEY":
        return mask_api_key(value)
    if option.secret:
        if not value:
            return "(not set)"
        count = len(value) if isinstance(value, tuple | list) else 1
        return "(set)" if isinstance(value, str) else f"({count} set)"
    if value is None or value == "" or value == ():
        return "(unset)"
    if name in ("RATELIMIT_STORAGE_URI", "CHATKIT_STORE_URL"):  # may hold a password
        return mask_storage_uri(value)
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def _echo(text: str, **style: Any) -> None:
    """Print one line with control characters escaped: an upstream's error text, a configured
    value or an operator's argument never sends escape sequences to the terminal."""
    click.secho(escape_control(text), **style)


def _ok(text: str) -> None:
    _echo(f"  ok    {text}")


def _fail(text: str) -> None:
    _echo(f"  FAIL  {text}", fg="red")


# ----------------------------------------------------------------------- check


class CheckFailed(click.ClickException):
    """``flask chatkit check`` found problems; the exit code says which kind (misconfigured
    wins over unreachable: there is no point waiting for a dependency with a wrong setting)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} check(s) failed")
        misconfigured = "misconfigured" in problems
        self.exit_code = EXIT_MISCONFIGURED if misconfigured else EXIT_UNREACHABLE


@chatkit_cli.command("check")
@click.option(
    "--live",
    is_flag=True,
    help="Also call the provider: hosted mode mints and cancels one session; server mode sends "
    "one tiny model request.",
)
def check_command(live: bool) -> None:
    """Validate the configuration, ping the limiter storage, (server mode) round-trip the thread
    store and (--live) call the provider. Exit 0 ok, 2 misconfigured, 3 unreachable."""
    state = _state()
    settings = state.settings
    problems: list[str] = []

    _echo(f"Backend: {settings.backend} ({settings.backend_reason})")
    _echo("Configuration (validated at start-up):")
    other = "hosted" if settings.backend == "server" else "server"
    # The running backend's keys (and the shared ones) first; the other backend's last, marked.
    ordered = sorted(options_in_reading_order(), key=lambda o: backend_of(o.name) == other)
    heading_done = False
    for option in ordered:
        name = option.name
        if backend_of(name) == other and not heading_done:
            _echo(f"Not read in {settings.backend} mode ({other} mode's keys):")
            heading_done = True
        try:
            value = _read(current_app.config, name)
        except ConfigError as exc:  # cannot normally happen: the app would not have started
            _fail(str(exc))
            problems.append("misconfigured")
            continue
        note = "  (service only: a host app configures the chatkit_flask logger)"
        if name not in SERVICE_ONLY_SETTINGS:
            note = ""
        _echo(f"  {name} = {_shown(name, value)}{note}")

    _echo("Limiter storage (Flask-Limiter's):")
    real = describe(state.limiter, current_app)
    uri = mask_storage_uri(real["storage_uri"])
    storage = storage_of(state.limiter)
    try:
        reachable = storage is not None and storage.check()
    except Exception:
        reachable = False
    if storage is None:
        _echo("  warn  rate limits are off (RATELIMIT_ENABLED=false, or not initialised)")
    elif reachable:
        _ok(f"{uri} answers")
        if real["storage_uri"].startswith("memory://"):
            _echo("  warn  memory:// limits are per process; use redis:// in production")
    else:
        _fail(f"cannot reach the limiter storage at {uri} (RATELIMIT_STORAGE_URI)")
        problems.append("unreachable")

    if state.server is not None:
        problems += _check_server(state, live)
    elif live:
        _echo(f"Upstream ({settings.api_base}):")
        problems += _check_live(state)
    else:
        _echo("Upstream: not contacted (add --live to mint and cancel one test session)")

    if problems:
        raise CheckFailed(problems)
    _echo("All checks passed.")


def _report(findings: list[Any]) -> list[str]:
    """Print server mode's findings; the problems among them."""
    for finding in findings:
        if finding.warning:
            _echo(f"  warn  {finding.text}")
        else:
            (_fail if finding.problem else _ok)(finding.text)
    return [finding.problem for finding in findings if finding.problem]


def _check_server(state: ChatKitState, live: bool) -> list[str]:
    problems: list[str] = []
    for title, findings in state.server.check_sections(live):  # server.runtime.ServerRuntime
        _echo(title)
        problems += _report(findings)
    return problems


def _upstream_message(exc: UpstreamError, state: ChatKitState) -> str:
    """A plain explanation of why the upstream call failed, without secrets."""
    settings = state.settings
    status = exc.status
    if isinstance(exc, UpstreamTimeout):
        return (
            f"the ChatKit API did not answer within CHATKIT_UPSTREAM_TIMEOUT="
            f"{settings.upstream_timeout:g}s (timeout)"
        )
    if status is None:
        host = urlsplit(settings.api_base).netloc
        return f"cannot reach CHATKIT_API_BASE host {host}: {exc}"
    if status == 401:
        return "the API key is wrong or revoked (OPENAI_API_KEY, upstream answered 401)"
    if status == 403:
        return (
            "permission denied (403): the API key may not use ChatKit; check the key's "
            "permissions and the project's role"
        )
    if status == 404:
        return (
            f"workflow not found: the key must belong to the workflow's project "
            f"(CHATKIT_WORKFLOW_ID={settings.workflow_id}, upstream answered 404)"
        )
    if isinstance(exc, UpstreamBusy):
        return f"the ChatKit API rate limited the check (429); retry in {exc.retry_after}s"
    detail = _upstream_detail(exc, settings.api_key)
    if 400 <= status < 500:
        return f"the ChatKit API rejected the session request ({status}){detail}"
    return f"the ChatKit API failed ({status}); try again later{detail}"


def _upstream_detail(exc: UpstreamError, api_key: str) -> str:
    try:
        message = json.loads(exc.detail)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f": {redact_credentials(str(message), api_key)[:200]}"


def _check_live(state: ChatKitState) -> list[str]:
    settings = state.settings
    try:
        session = state.client.create_session(
            workflow_id=settings.workflow_id,
            user=CHECK_USER,
            ttl=min(settings.session_ttl, _CHECK_TTL),
            workflow_version=settings.workflow_version,
            rate_limit=settings.session_rate_limit,
            chatkit_configuration=settings.chatkit_configuration,
        )
    except UpstreamError as exc:
        request_id = f" [upstream request id {exc.request_id}]" if exc.request_id else ""
        _fail(_upstream_message(exc, state) + request_id)
        return [_upstream_problem(exc)]
    _ok(
        f"minted session {session.session_id or '(no id)'} for workflow {settings.workflow_id} "
        f"in {session.latency_ms:.0f} ms"
    )
    if not session.session_id:
        _fail("the upstream answered without a session id: cannot cancel the test session")
        return ["unreachable"]
    try:
        state.client.cancel_session(session.session_id)
    except UpstreamError as exc:
        _fail(f"could not cancel the test session (it expires by itself): {exc}")
        return [_upstream_problem(exc)]
    _ok(f"cancelled session {session.session_id}")
    return []


def _upstream_problem(exc: UpstreamError) -> str:
    """A refusal of what we sent (key, permissions, workflow, request) is ours to fix; no
    answer, a timeout, a 429 or a 5xx is the upstream's state."""
    status = exc.status
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return "misconfigured"
    return "unreachable"


# ----------------------------------------------------------------------- limits


def _limits_line(value: str) -> str:
    return value.replace(";", "; ") if value else "off"


def _rendered(limits: list[Any]) -> str:
    return "; ".join(str(limit.limit) for limit in limits)


@chatkit_cli.command("limits")
def limits_command() -> None:
    """Print every limit the chat answers to (both backends) and the storage Flask-Limiter
    really uses."""
    state = _state()
    settings = state.settings
    real = describe(state.limiter, current_app)
    server = state.server is not None
    counted = " (messages)" if server else ""
    rows = [
        ("enabled", "yes" if real["enabled"] else "no (RATELIMIT_ENABLED=false)"),
        ("per user", _limits_line(settings.limit_per_user) + counted),
        (
            "per IP",
            f"{_limits_line(settings.limit_per_ip)}{counted} (IPv6 per /{settings.ipv6_prefix})",
        ),
        ("per IPv6 /48", _limits_line(settings.limit_per_ipv6_48) + counted),
        ("global", _limits_line(settings.limit_global) + counted),
    ]
    if server:
        rows += [
            ("requests/IP", _limits_line(settings.limit_requests_per_ip) + " (every request)"),
            ("streams", f"{settings.max_streams_per_user} at once per visitor or user"),
            ("tokens/user", _limits_line(settings.tokens_per_user)),
            ("tokens/site", _limits_line(settings.tokens_global)),
        ]
    manager = state.limiter.limit_manager
    if manager.application_limits:
        rows.append(("host app", _rendered(manager.application_limits) + " (counts the chat too)"))
    if manager.default_limits:
        applies = (
            "counts the chat too: CHATKIT_HOST_DEFAULT_LIMITS=true"
            if settings.host_default_limits
            else "not on the chat's routes: CHATKIT_HOST_DEFAULT_LIMITS=false"
        )
        rows.append(("host default", f"{_rendered(manager.default_limits)} ({applies})"))
    rows += [
        ("strategy", real["strategy"]),
        ("storage", mask_storage_uri(real["storage_uri"])),
        ("key prefix", real["key_prefix"] or "(none)"),
        ("storage down", real["outage"]),
    ]
    for label, value in rows:
        _echo(f"{label + ':':<14}{value}")
    _echo("(Flask-Limiter's own view, with usage per key: flask limiter limits)")


# ----------------------------------------------------------------------- usage / reset

# Which of the endpoint's limit rules (LimitRule.scope) count each kind of key.
_RULES_OF = {"user": ("user",), "ip": ("ip", "requests"), "global": ("global",)}


def _key_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--visitor",
                help="Anonymous visitor: raw id, cookie value (or name=value as the browser "
                "shows it, e.g. __Host-chatkit_session_id=...), visitor_<id> or log id v:<hash>.",
            ),
            click.option("--user", help="Signed-in user id as the host app's user_loader gives."),
            click.option("--ip", help="Client IP address (IPv6: its configured prefix)."),
            click.option("--global", "global_", is_flag=True, help="The site-wide limit."),
        ]
    ):
        func = option(func)
    return func


def _resolve_key(
    state: ChatKitState,
    visitor: str | None,
    user: str | None,
    ip: str | None,
    global_: bool,
) -> tuple[str, str]:
    """(limiter key, kind: "user", "ip" or "global") for exactly one of the options."""
    given = [x for x in (visitor, user, ip) if x is not None] + (["global"] if global_ else [])
    if len(given) != 1:
        raise click.UsageError("give exactly one of --visitor, --user, --ip or --global")
    settings = state.settings
    if visitor is not None:
        text = visitor.strip()
        if text.startswith("v:"):
            return "visitor:" + text[2:], "user"
        text = text.rpartition("=")[2].strip()  # "__Host-chatkit_session_id=<value>"
        text = text.split(".", 1)[0]  # a cookie value is "<id>.<timestamp>.<signature>"
        text = text.removeprefix("visitor_")
        if not text:
            raise click.BadParameter("empty visitor id", param_hint="--visitor")
        return "visitor:" + hash_id(text), "user"
    if user is not None:
        return "user:" + hash_id("user:" + user), "user"
    if ip is not None:
        network = client_network(ip.strip(), settings.ipv6_prefix)
        if network == "unknown":
            raise click.BadParameter(f"not an IP address: {ip!r}", param_hint="--ip")
        return "ip:" + network, "ip"
    return "global", "global"


def _uri(state: ChatKitState) -> str:
    return mask_storage_uri(describe(state.limiter, current_app)["storage_uri"])


def _strategy(state: ChatKitState) -> Any:
    if storage_of(state.limiter) is None:
        raise click.ClickException("rate limits are off (RATELIMIT_ENABLED=false): no counters")
    return state.limiter.limiter


def _limit_counters(
    state: ChatKitState, key: str, kind: str
) -> list[tuple[str, RateLimitItem, list[str]]]:
    """``(label, limit, identifiers)`` of the endpoint's Flask-Limiter counters for ``key``:
    the counters the limiter wrote, found from the rules the backend declared."""
    counters = []
    for rule in state.limit_rules:
        if rule.scope not in _RULES_OF[kind]:
            continue
        scope = f"{state.limit_endpoint}:{rule.counter}" if rule.counter else state.limit_endpoint
        label = f"{rule.counter} " if rule.counter else ""
        for item in parse_many(rule.value):
            counters.append((label, item, counter_args(state.limiter, key, scope)))
    return counters


def _budget_owners(key: str, kind: str) -> list[str | None]:
    """Whose token budgets ``key`` counts: the owner's, the site's (None) or none (an IP)."""
    return {"user": [key], "global": [None]}.get(kind, [])


def _nothing_to_show(state: ChatKitState, kind: str, counters: list[Any]) -> bool:
    server = state.server
    if counters or server is None:
        return not counters
    if kind == "user":
        return False  # stream slots at least
    return kind != "global" or not server.budget.counters(None)


def _storage_failed(state: ChatKitState, verb: str, exc: Exception) -> click.ClickException:
    return click.ClickException(
        f"cannot {verb} the limiter storage at {_uri(state)}: {type(exc).__name__}"
    )


def _remaining(item: RateLimitItem, used: int, resets: int) -> str:
    remaining = max(0, item.amount - used)
    when = f", resets in {resets}s" if used else ""
    return f"{item}: {remaining} of {item.amount} remaining ({min(used, item.amount)} used{when})"


@chatkit_cli.command("usage")
@_key_options
def usage_command(visitor: str | None, user: str | None, ip: str | None, global_: bool) -> None:
    """Show what remains of each limit for one visitor, user, IP or the global key (server
    mode: messages, requests, stream slots and token budgets too)."""
    state = _state()
    key, kind = _resolve_key(state, visitor, user, ip, global_)
    counters = _limit_counters(state, key, kind)
    if _nothing_to_show(state, kind, counters):
        raise click.ClickException(f"the {kind} limit is off: nothing to show")
    _echo(f"{kind} limits for {key}:")
    now = time.time()
    try:
        for label, item, args in counters:
            stats = _strategy(state).get_window_stats(item, *args)
            used = item.amount - max(0, min(stats.remaining, item.amount))
            resets = max(0, math.ceil(stats.reset_time - now)) if used else 0
            _echo(f"  {label}{_remaining(item, used, resets)}")
        server = state.server
        if server is not None:
            _strategy(state)
            if kind == "user":
                held = server.slots.open_streams(key)
                shown = (
                    f"{held} of {server.slots.cap} open"
                    if held is not None
                    else "counted per worker (no Redis): not visible here"
                )
                _echo(f"  streams: {shown}")
            for owner in _budget_owners(key, kind):
                for scope, item, used, resets in server.budget.usage(owner):
                    _echo(f"  {scope} {_remaining(item, used, resets)}")
    except STORAGE_ERRORS as exc:
        raise _storage_failed(state, "read", exc) from None


@chatkit_cli.command("reset")
@_key_options
def reset_command(visitor: str | None, user: str | None, ip: str | None, global_: bool) -> None:
    """Clear one visitor's, user's, IP's or the global counters (server mode: their stream
    slots and token budgets too)."""
    state = _state()
    key, kind = _resolve_key(state, visitor, user, ip, global_)
    counters = _limit_counters(state, key, kind)
    if _nothing_to_show(state, kind, counters):
        raise click.ClickException(f"the {kind} limit is off: nothing to show")
    cleared = had_hits = 0
    try:
        for _, item, args in counters:
            if _strategy(state).get_window_stats(item, *args).remaining < item.amount:
                had_hits += 1
            _strategy(state).clear(item, *args)
            cleared += 1
        server = state.server
        if server is not None:
            _strategy(state)
            if kind == "user" and server.slots.open_streams(key) is not None:
                had_hits += server.slots.open_streams(key) > 0
                server.slots.clear(key)
                cleared += 1
            for owner in _budget_owners(key, kind):
                cleared += len(server.budget.counters(owner))
                had_hits += server.budget.clear(owner)
    except STORAGE_ERRORS as exc:
        raise _storage_failed(state, "reach", exc) from None
    _echo(f"Cleared {cleared} {kind} limit counter(s) for {key} ({had_hits} had been used).")


# ----------------------------------------------------------------------- server mode: data


def _server(state: ChatKitState) -> Any:
    if state.server is None:
        raise click.ClickException("threads are stored in server mode only (CHATKIT_BACKEND)")
    return state.server


def _owner_options(func: Any) -> Any:
    func = click.option("--user", help="Signed-in user id as the host app's user_loader gives.")(
        func
    )
    return click.option(
        "--visitor",
        help="Anonymous visitor: raw id, cookie value, visitor_<id> or log id v:<hash>.",
    )(func)


def _owner(state: ChatKitState, visitor: str | None, user: str | None) -> str:
    if (visitor is None) == (user is None):
        raise click.UsageError("give exactly one of --visitor or --user")
    key, _ = _resolve_key(state, visitor, user, None, False)
    return key  # the store's owner is the identity's limit key


@chatkit_cli.command("threads")
@_owner_options
def threads_command(visitor: str | None, user: str | None) -> None:
    """List one visitor's or user's stored threads (server mode; titles are not shown)."""
    state = _state()
    server = _server(state)
    owner = _owner(state, visitor, user)
    threads = server.bridge.run(lambda: server.store.list_owner_threads(owner), 30)
    _echo(f"{len(threads)} thread(s) of {owner}:")
    for thread in threads:
        _echo(f"  {thread.id}  created {thread.created_at:%Y-%m-%d %H:%M:%S}")


@chatkit_cli.command("purge")
@_owner_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge_command(visitor: str | None, user: str | None, yes: bool) -> None:
    """Delete every thread and item of one visitor or user (a support or erasure request)."""
    state = _state()
    server = _server(state)
    owner = _owner(state, visitor, user)
    if not yes:
        click.confirm(f"Delete every thread of {owner}?", abort=True)
    files = 0
    if server.attachments is not None:  # the bytes first: their metadata names them
        files = server.attachments.purge_owner_files(owner, lambda f: server.bridge.run(f, 60))
    deleted = server.bridge.run(lambda: server.store.purge_owner(owner), 60)
    attached = f" and {files} attachment(s)" if server.attachments is not None else ""
    _echo(f"Deleted {deleted} thread(s) of {owner} and their items{attached}.")


@chatkit_cli.command("prune")
def prune_command() -> None:
    """Apply CHATKIT_THREAD_TTL to every stored thread: delete those inactive for longer (Redis:
    re-expire the others from their last activity), with their attachments, and sweep
    attachment files nothing refers to. Run it daily, and after shortening the TTL."""
    server = _server(_state())
    pruned = server.bridge.run(lambda: server.store.prune(), 600)
    ttl = server.settings.thread_ttl
    _echo(f"Pruned {pruned} thread(s) inactive for CHATKIT_THREAD_TTL={ttl}s or more.")
    if server.attachments is not None:  # then the bytes whose metadata went with them
        swept = server.attachments.sweep(lambda f: server.bridge.run(f, 600))
        _echo(f"Deleted {swept} attachment file(s) no thread or upload refers to.")


# ------------------------------------------------------------- server mode: the SQL store's tables

db_cli = AppGroup("db", help="The SQL store's tables (CHATKIT_STORE_URL=postgresql+psycopg://...): "
                  "the migrations shipped with the package.")  # fmt: skip
chatkit_cli.add_command(db_cli)


def db_command_running() -> bool:
    """Whether this process runs ``flask chatkit db ...``. Flask loads the app before it finds
    the command, and start-up refuses a SQL store whose tables are behind: that refusal must let
    the one command that brings them up run."""
    if click.get_current_context(silent=True) is None:
        return False  # not under the flask command line (gunicorn, a test)
    args = sys.argv[1:]
    return any(args[i : i + 2] == ["chatkit", "db"] for i in range(len(args)))


def _sql_store(state: ChatKitState) -> Any:
    store = _server(state).store
    if not hasattr(store, "upgrade_schema"):
        raise click.ClickException(
            f"the {store} has no tables to migrate: only the SQL store "
            "(CHATKIT_STORE_URL=postgresql+psycopg://...) does"
        )
    return store


@db_cli.command("upgrade")
@click.option("--sql", is_flag=True, help="Print the SQL it would run (from the tables' current "
              "revision), for a database administrator; change nothing.")  # fmt: skip
def db_upgrade_command(sql: bool) -> None:
    """Create or upgrade the SQL store's tables to this version (run before starting a new
    version; safe to run again: it does nothing when they are up to date)."""
    store = _sql_store(_state())
    before, head = store.schema_revisions()
    if sql:
        click.echo(store.upgrade_script(before) if before != head else f"-- at {head} already")
        return
    if before == head:
        _echo(f"The {store}'s tables are up to date (revision {head}).")
        return
    reached = store.upgrade_schema()
    _echo(f"Upgraded the {store}'s tables from {before or 'nothing'} to revision {reached} "
          f"(tables {store.tables.prefix}*).")  # fmt: skip


@db_cli.command("current")
def db_current_command() -> None:
    """Show the revision the SQL store's tables are at and the one this version needs; exit 1
    when they are behind."""
    store = _sql_store(_state())
    current, head = store.schema_revisions()
    _echo(f"{store} tables {store.tables.prefix}*: at {current or 'nothing (never created)'}, "
          f"this version needs {head}.")  # fmt: skip
    if current != head:
        _echo("Run `flask chatkit db upgrade`.")
        raise SystemExit(1)
