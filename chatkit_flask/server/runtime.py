"""What one app's server mode runs with, built once at ``init_app`` (so a bad agent, store URL or
instructions file stops start-up): the bridge to asyncio, the store, the agent and its model
client, the ChatKit server and the stream slots."""

from __future__ import annotations

import asyncio
import atexit
import logging
import weakref
from collections.abc import Callable
from typing import Any

from flask import Flask

from ..settings import Settings
from .agent import ModelClient, build_plain_agent, load_agent_spec
from .bridge import AsyncBridge
from .budget import TokenBudget
from .context import RequestContext
from .protocol import FlaskChatKitServer, TokenUsage
from .sitecode import SiteCode
from .slots import StreamSlots
from .store import OwnerScopedStore, open_store

__all__ = ["ServerRuntime"]

log = logging.getLogger("chatkit_flask")

# Every runtime of this process, closed at exit (weakly held: a test's app may go away).
_RUNTIMES: weakref.WeakSet[ServerRuntime] = weakref.WeakSet()


class ServerRuntime:
    """Server mode's long-lived parts. Loop-bound clients (the model client, the Redis store's
    client) are made on the bridge's loop, once per worker process."""

    def __init__(
        self, settings: Settings, limiter_storage: Callable[[], Any], app: Flask | None = None
    ) -> None:
        self.settings = settings
        self.bridge = AsyncBridge()
        self.store: OwnerScopedStore = open_store(
            settings.store_url, thread_ttl=settings.thread_ttl
        )
        agent = (
            load_agent_spec(settings.agent)
            if settings.agent
            else build_plain_agent(settings.agent_model, settings.agent_instructions)
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
            site=SiteCode(app) if app is not None else None,
        )
        self.budget = TokenBudget(
            limiter_storage, settings.tokens_per_user, settings.tokens_global
        )
        self.slots = StreamSlots(
            limiter_storage, settings.max_streams_per_user, lease=settings.model_timeout + 60
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

    def _on_usage(self, context: RequestContext, usage: TokenUsage) -> None:
        """On the loop after every answer: keep it for the log line, tell the hooks."""
        context.report["usage"] = usage
        if self.budget.enabled:  # a storage call: off the loop
            tokens = usage.input_tokens + usage.output_tokens
            asyncio.get_running_loop().run_in_executor(
                None, self.budget.charge, context.owner, tokens
            )
        for hook in self.usage_hooks:
            try:
                hook(context, usage)
            except Exception:  # a hook must never break the answer
                log.exception("chatkit_flask: usage hook failed")


@atexit.register
def _close_all() -> None:
    for runtime in list(_RUNTIMES):
        try:
            runtime.close(timeout=2.0)
        except Exception:  # exiting anyway: one failure must not keep the others open
            log.debug("chatkit_flask: closing a runtime at exit failed", exc_info=True)
