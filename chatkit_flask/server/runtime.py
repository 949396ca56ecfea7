"""What one app's server mode runs with, built once at ``init_app`` (so a bad agent, store URL or
instructions file stops start-up): the bridge to asyncio, the store, the agent and its model
client, the ChatKit server and the stream slots."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..settings import ConfigError, Settings
from .agent import ModelClient, build_plain_agent, instruction_dirs, load_agent_spec
from .bridge import AsyncBridge
from .budget import TokenBudget
from .context import RequestContext
from .protocol import FlaskChatKitServer, TokenUsage
from .slots import StreamSlots
from .store import OwnerScopedStore, open_store

__all__ = ["DEFAULT_STORE_FILE", "ServerRuntime", "default_store_url"]

# The thread store when CHATKIT_STORE_URL is unset: a SQLite file in the app's instance folder.
DEFAULT_STORE_FILE = "chatkit-threads.db"

log = logging.getLogger("chatkit_flask")


class ServerRuntime:
    """Server mode's long-lived parts. Loop-bound clients (the model client, the Redis store's
    client) are made on the bridge's loop, once per worker process."""

    def __init__(
        self, settings: Settings, limiter_storage: Callable[[], Any], instance_path: str
    ) -> None:
        self.settings = settings
        self.bridge = AsyncBridge()
        self.store: OwnerScopedStore = open_store(
            settings.store_url or default_store_url(instance_path), thread_ttl=settings.thread_ttl
        )
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
        )
        self.budget = TokenBudget(
            limiter_storage, settings.tokens_per_user, settings.tokens_global
        )
        self.slots = StreamSlots(
            limiter_storage, settings.max_streams_per_user, lease=settings.model_timeout + 60
        )

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


def default_store_url(instance_path: str) -> str:
    """``sqlite:///<instance folder>/chatkit-threads.db``, the folder created if missing (Flask
    leaves that to the app): a host app's threads live with its other files, whatever the
    working directory of the process."""
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
