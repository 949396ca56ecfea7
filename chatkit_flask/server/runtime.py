"""What one app's server mode runs with, built once at ``init_app`` (so a bad agent, store URL or
instructions file stops start-up): the bridge to asyncio, the store, the agent and its model
client, the ChatKit server, the token budgets (a reply reserves before the model is called and
settles after it ends) and the stream slots."""

from __future__ import annotations

import asyncio
import atexit
import logging
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chatkit.errors import CustomStreamError
from flask import Flask

from ..settings import ConfigError, Settings
from ..state import RegisteredAction
from .agent import ModelClient, build_plain_agent, instruction_dirs, load_agent_spec
from .bridge import AsyncBridge
from .budget import BudgetSpent, TokenBudget
from .context import RequestContext
from .health import Finding, check_model, check_store, model_name
from .protocol import FlaskChatKitServer, TokenUsage
from .sitecode import SiteCode
from .slots import StreamSlots
from .store import REDIS_SCHEMES, STORE_URL_KEY, OwnerScopedStore, StoreUnusable, open_store

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
    ) -> None:
        self.settings = settings
        self.bridge = AsyncBridge()
        instance_path = app.instance_path if app is not None else None
        # Unset: a SQLite file in the app's instance folder, never relative to the cwd.
        self.store_url = settings.store_url or default_store_url(instance_path)
        self.store: OwnerScopedStore = open_store(self.store_url, thread_ttl=settings.thread_ttl)
        try:
            self.check_store(write=True, timeout=STARTUP_PROBE_TIMEOUT, key=STORE_URL_KEY)
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
        )
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

    def close(self, timeout: float = 5.0) -> None:
        """Close this process's loop-bound clients (store, model), then stop the event loop
        thread and its worker threads. Safe to call twice; a later request starts afresh."""

        async def close_clients() -> None:
            aclose = getattr(self.store, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()
            finally:
                await self.model.aclose()

        self.bridge.close(timeout, cleanup=close_clients)

    def check_store(
        self, *, write: bool, timeout: float, key: str | None = None
    ) -> None:
        """Probe the store (see ``OwnerScopedStore.probe``). Raises :class:`StoreUnusable`, or
        with ``key`` a ``ConfigError`` naming that key and the cause (start-up)."""
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
        if live:
            sections.append((f"Model ({model_name(self)} at {base}):", check_model(self)))
        else:
            sections.append((f"Model: not contacted (add --live to send one tiny request to "
                             f"{base})", []))  # fmt: skip
        return sections

    async def _admit(self, context: RequestContext, tokens: int) -> None:
        """On the loop before the model is called: reserve the reply's worst case, or refuse
        inside the stream when a budget is spent (a race the view's look before did not see)."""
        if not self.budget.enabled:
            return
        try:  # a storage call: off the loop
            context.report["reservation"] = await asyncio.to_thread(
                self.budget.reserve, context.owner, tokens
            )
        except BudgetSpent as spent:
            context.report["refused_scope"] = spent.scope
            raise CustomStreamError(
                f"{BUDGET_MESSAGES[spent.scope]}. Try again in {spent.retry_after} seconds.",
                allow_retry=True,
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
