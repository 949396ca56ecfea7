"""What one app's server mode runs with, built once at ``init_app`` (so a bad agent, store URL or
instructions file stops start-up): the bridge to asyncio, the store, the agent and its model
client, the ChatKit server, the token budgets (a reply reserves before the model is called and
settles after it ends) and the stream slots."""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask

from ..cli import db_command_running
from ..settings import ConfigError, Settings
from ..state import RegisteredAction
from .agent import ModelClient, build_plain_agent, instruction_dirs, load_agent_spec
from .attachments import AttachmentPolicy, Attachments
from .bridge import AsyncBridge
from .budget import BudgetSpent, TokenBudget
from .context import RequestContext
from .dictation import Dictation
from .files import FILES_URL_KEY, FileStorage, FilesUnusable, open_files
from .health import Finding, check_files, check_model, check_store, model_name
from .protocol import FlaskChatKitServer, OverBudget, TokenUsage
from .sitecode import SiteCode
from .slots import StreamSlots
from .store import (
    REDIS_SCHEMES,
    STORE_URL_KEY,
    OwnerScopedStore,
    StoreUnusable,
    open_sql_store,
    open_store,
)

__all__ = [
    "DEFAULT_STORE_FILE",
    "READY_PROBE_TIMEOUT",
    "STARTUP_PROBE_TIMEOUT",
    "ServerRuntime",
    "default_store_url",
]

# The thread store when CHATKIT_STORE_URL is unset: a SQLite file in the app's instance folder.
DEFAULT_STORE_FILE = "chatkit-threads.db"

log = logging.getLogger("chatkit_flask")

STARTUP_PROBE_TIMEOUT = 15.0  # seconds: above SQLite's busy timeout (10 s) and Redis's (3 + 3 s)
READY_PROBE_TIMEOUT = 2.0  # seconds: /readyz answers within the compose healthcheck's 2 s

# The refusals the ChatKit UI shows (the view refuses with the same words before the stream).
BUDGET_MESSAGES = {
    "tokens": "You have used up your share of the assistant for now",
    "tokens_global": "The assistant has used up the site's budget for now",
}
# Every runtime of this process, closed at exit (weakly held: a test's app may go away).
_RUNTIMES: weakref.WeakSet[ServerRuntime] = weakref.WeakSet()


class ServerRuntime:
    """Server mode's long-lived parts. Loop-bound clients (the model client, the Redis store's
    client) are made on the bridge's loop, once per worker process."""

    def __init__(
        self,
        settings: Settings,
        limiter_storage: Callable[[], Any],
        app: Flask | None = None,
        actions: Mapping[str, RegisteredAction] | None = None,
        store_engine: Any = None,
    ) -> None:
        self.settings = settings
        self.bridge = AsyncBridge()
        self._adopting = threading.Lock()
        instance_path = app.instance_path if app is not None else None
        self.store = open_runtime_store(settings, instance_path, store_engine, app)
        # For messages only (masked there): a host's engine's URL without its password.
        self.store_url = settings.store_url or getattr(self.store, "display_url", None) or (
            default_store_url(instance_path)
        )
        try:
            self.check_store(write=True, timeout=STARTUP_PROBE_TIMEOUT, key=STORE_URL_KEY,
                             schema_behind_ok=db_command_running())  # fmt: skip
        except ConfigError:
            self.bridge.close()  # the probe started the loop thread: a failed start leaves none
            raise
        self.store_findings = store_findings(settings)
        agent = (
            load_agent_spec(settings.agent)
            if settings.agent
            else build_plain_agent(
                settings.agent_model,
                settings.agent_instructions,
                instruction_dirs(instance_path),
            )
        )
        if settings.demo and not settings.agent:
            from .demo_client_tool import with_client_tool
            from .demo_site import CHOOSE_ACTION, with_demo_tool

            if CHOOSE_ACTION in (actions or {}):  # the service registered the demo's card
                # The card's tool, and the client tool the demo page answers.
                agent = with_client_tool(with_demo_tool(agent))
        if settings.agent_tracing:
            from agents import set_tracing_export_api_key

            set_tracing_export_api_key(settings.api_key)
        self.model = ModelClient(
            api_key=settings.api_key,
            base_url=settings.openai_base_url,
            timeout=settings.model_timeout,
            disable_tracing=not settings.agent_tracing,
        )
        self.usage_hooks: list[Callable[[RequestContext, TokenUsage], None]] = []
        self.files = self._open_files(settings, instance_path) if settings.attachments else None
        dictation = None
        if settings.transcribe_model:
            dictation = Dictation(
                settings.transcribe_model, self.model, settings.transcribe_max_bytes
            )
        self.server = FlaskChatKitServer(
            self.store,
            agent,
            self.model,
            history_items=settings.history_items,
            max_input_chars=settings.max_input_chars,
            on_usage=self._on_usage,
            history_max_chars=settings.history_max_chars,
            max_output_tokens=settings.max_output_tokens,
            max_turns=settings.agent_max_turns,
            reply_timeout=settings.reply_timeout,
            admit=self._admit,
            site=SiteCode(app) if app is not None else None,
            actions=actions,
            titles=settings.title_model != "off",
            title_model=settings.title_model or None,
            client_tool_max_chars=settings.client_tool_max_chars,
            attachments=self._attachments_factory(settings, limiter_storage),
            dictation=dictation,
        )
        self.attachments: Attachments | None = self.server.attachments
        self.budget = TokenBudget(
            limiter_storage, settings.tokens_per_user, settings.tokens_global
        )
        self.slots = StreamSlots(
            limiter_storage, settings.max_streams_per_user, lease=settings.stream_slot_lease
        )
        # Open replies per client network (IPv4 address, IPv6 /64) across workers and hosts, and
        # per worker process (each open reply holds one of its threads: keep some for reads).
        self.network_streams = StreamSlots(
            limiter_storage,
            settings.max_streams_per_ip,
            lease=settings.stream_slot_lease,
            prefix="chatkit:streams-ip",
        )
        self.worker_streams = StreamSlots(
            lambda: "this process",
            settings.max_streams_per_worker or 1_000_000,
            lease=settings.stream_slot_lease,
            prefix="chatkit:streams-worker",
            in_process=True,
        )
        # One reply at a time per thread (the widget never sends two; a second one could answer
        # the wrong message): a slot of one per thread, held like the visitor's.
        self.thread_replies = StreamSlots(
            limiter_storage, 1, lease=settings.stream_slot_lease, prefix="chatkit:replying"
        )
        _RUNTIMES.add(self)

    def _open_files(self, settings: Settings, instance_path: str | None) -> FileStorage:
        """The attachment storage, checked writable (else ``ConfigError`` naming the key)."""
        files = open_files(
            settings.files_url,
            instance_path=instance_path,
            s3_endpoint_url=settings.s3_endpoint_url,
        )
        try:
            files.probe()
        except FilesUnusable as exc:
            self.bridge.close()
            raise ConfigError(FILES_URL_KEY, f"the {files} cannot be used: {exc}") from None
        return files

    def _attachments_factory(
        self, settings: Settings, limiter_storage: Callable[[], Any]
    ) -> Callable[[Any], Attachments] | None:
        files = self.files
        if files is None:
            return None
        policy = AttachmentPolicy(
            max_bytes=settings.attachment_max_bytes,
            daily_bytes=settings.attachment_daily_bytes,
            types=frozenset(settings.attachment_types),
            upload_ttl=settings.attachment_upload_ttl,
            per_message=settings.attachments_per_message,
        )
        keys = [*settings.secret_key_fallbacks, settings.secret_key]  # the last one signs
        return lambda store: Attachments(store, files, policy, limiter_storage, keys)

    def close(self, timeout: float = 5.0) -> None:
        """Close this process's loop-bound clients (store, model), then stop the event loop
        thread and its worker threads. Safe to call twice; a later request starts afresh."""
        self.bridge.close(timeout, cleanup=self._close_clients)

    def adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop`` (the ASGI worker's) from now on; the clients made on the bridge's own
        loop (the start-up probe's) are closed with it."""
        with self._adopting:
            self.bridge.adopt(loop, cleanup=self._close_clients)

    async def _close_clients(self) -> None:
        aclose = getattr(self.store, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            await self.model.aclose()

    def check_store(
        self, *, write: bool, timeout: float, key: str | None = None,
        schema_behind_ok: bool = False,
    ) -> None:  # fmt: skip
        """Probe the store (see ``OwnerScopedStore.probe``). Raises :class:`StoreUnusable`, or
        with ``key`` a ``ConfigError`` naming that key and the cause (start-up).
        ``schema_behind_ok``: `flask chatkit db upgrade` loads the app before it runs, and the
        app must load for it to bring the SQL store's tables up (a warning instead)."""
        try:
            try:
                self.bridge.run(lambda: self.store.probe(write=write), timeout)
            except TimeoutError:
                raise StoreUnusable(
                    f"the {self.store} did not answer within {timeout:g} s", "timeout"
                ) from None
        except StoreUnusable as exc:
            if key is None:
                raise
            if schema_behind_ok and exc.reason == "schema_behind":
                log.warning("chatkit_flask: the %s: %s", self.store, exc.cause)
                return
            raise ConfigError(key, f"the {self.store} cannot be used: {exc.cause}") from None

    def ready_problem(self) -> str | None:
        """For ``/readyz``: None when the store answers a cheap probe within
        :data:`READY_PROBE_TIMEOUT`, else a short reason (the cause goes to the log)."""
        try:
            self.check_store(write=False, timeout=READY_PROBE_TIMEOUT)
        except StoreUnusable as exc:
            log.warning("chatkit_flask: not ready: the %s cannot be used: %s", self.store,
                        exc.cause)
            return exc.reason
        return None

    def check_sections(self, live: bool) -> list[tuple[str, list[Finding]]]:
        """For ``flask chatkit check``: (title, findings) of the store round trip and, when
        ``live``, of one tiny model request."""
        base = self.settings.openai_base_url or "https://api.openai.com/v1"
        warnings = [Finding(text, warning=True) for text in self.store_findings]
        sections = [("Thread store:", check_store(self) + warnings)]
        if self.files is not None:
            sections.append(("Attachment storage:", check_files(self)))
        if live:
            sections.append((f"Model ({model_name(self)} at {base}):", check_model(self)))
        else:
            sections.append((f"Model: not contacted (add --live to send one tiny request to "
                             f"{base})", []))  # fmt: skip
        return sections

    async def _admit(self, context: RequestContext, tokens: int) -> None:
        """On the loop before the model is called: reserve the worst case of a reply (or a
        recording), or raise :class:`OverBudget` when a budget is spent (a race the view's look
        before did not see)."""
        if not self.budget.enabled:
            return
        try:  # a storage call: off the loop
            context.report["reservation"] = await asyncio.to_thread(
                self.budget.reserve, context.owner, tokens
            )
        except BudgetSpent as spent:
            context.report["refused_scope"] = spent.scope
            raise OverBudget(
                f"{BUDGET_MESSAGES[spent.scope]}. Try again in {spent.retry_after} seconds.",
                spent.scope,
                spent.retry_after,
            ) from None

    def _on_usage(self, context: RequestContext, usage: TokenUsage) -> None:
        """On the loop after every answer: keep it for the log line, settle the reservation
        with what the answer cost, tell the hooks."""
        context.report["usage"] = usage
        if self.budget.enabled:  # a storage call: off the loop
            asyncio.get_running_loop().run_in_executor(
                None,
                self.budget.settle,
                context.report.get("reservation"),
                context.owner,
                usage.charged_tokens,
            )
        for hook in self.usage_hooks:
            try:
                hook(context, usage)
            except Exception:  # a hook must never break the answer
                log.exception("chatkit_flask: usage hook failed")


def open_runtime_store(
    settings: Settings, instance_path: str | None, store_engine: Any, app: Flask | None
) -> OwnerScopedStore:
    """The store the settings (or the host's ``store_engine``) name; SQLite in the instance
    folder when neither does."""
    options: dict[str, Any] = {
        "thread_ttl": settings.thread_ttl,
        "table_prefix": settings.store_table_prefix,
        "pool_size": settings.store_pool_size,
        "timeout": settings.store_timeout,
    }
    if store_engine is None:
        # Unset: a SQLite file in the app's instance folder, never relative to the cwd.
        return open_store(settings.store_url or default_store_url(instance_path), **options)
    if settings.store_url:
        raise ConfigError(
            STORE_URL_KEY, "is set, and the app hands ChatKit a database (store_engine): use one"
        )
    from .store_sql import host_engine_url

    try:
        url = host_engine_url(store_engine, app, settings.store_bind)
    except LookupError as exc:
        raise ConfigError("CHATKIT_STORE_BIND", str(exc)) from None
    except TypeError as exc:
        raise ConfigError(STORE_URL_KEY, str(exc)) from None
    return open_sql_store(url, **options)  # a ConfigError names the driver to install


def default_store_url(instance_path: str | None) -> str:
    """``sqlite:///<instance folder>/chatkit-threads.db``, the folder created if missing (Flask
    leaves that to the app): a host app's threads live with its other files, whatever the
    working directory of the process."""
    if instance_path is None:
        raise ConfigError(STORE_URL_KEY, "is required when the runtime is built without an app")
    folder = Path(instance_path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            "CHATKIT_STORE_URL",
            f"is unset, so threads go to the instance folder {folder}, which cannot be created "
            f"({exc.strerror}); set CHATKIT_STORE_URL or the app's instance_path",
        ) from None
    return f"sqlite:///{(folder / DEFAULT_STORE_FILE).resolve()}"


def store_findings(settings: Settings) -> list[str]:
    """Warn at start-up (and refuse, when ``CHATKIT_STORE_REQUIRE_PERSISTENCE`` asks) about a
    store that would lose threads; returns the findings for ``flask chatkit check``."""
    if not settings.store_url or urlsplit(settings.store_url).scheme.lower() not in REDIS_SCHEMES:
        return []  # unset: SQLite in the instance folder
    from .store_redis import persistence_findings

    findings = persistence_findings(settings.store_url)
    if findings and settings.store_require_persistence:
        raise ConfigError("CHATKIT_STORE_REQUIRE_PERSISTENCE", "is true, but " + " ".join(findings))
    for finding in findings:
        log.warning("chatkit_flask: %s", finding)
    return findings


@atexit.register
def _close_all() -> None:
    for runtime in list(_RUNTIMES):
        try:
            runtime.close(timeout=2.0)
        except Exception:  # exiting anyway: one failure must not keep the others open
            log.debug("chatkit_flask: closing a runtime at exit failed", exc_info=True)
