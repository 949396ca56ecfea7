"""The site's own code, run by the extension on the bridge's event loop, inside the host app.

Agent tools and a per-request agent factory run on the loop thread, where no Flask context
exists. Each call gets a FRESH app context of the host app, pushed before it and popped after
it, so ``current_app``, ``g`` and ``db.session`` work as they do in a CLI command and the host's
``teardown_appcontext`` handlers run: Flask-SQLAlchemy gives its pooled connection back there.
There is no request (``request`` and ``current_user`` are not available): site code reads the
signed-in user's id from :attr:`RequestContext.user_id`.

Built against openai-agents 0.24.x: a ``@function_tool``'s invoker keeps the SDK's failure
handling outside its ``_invoke_tool_impl``; the app context goes inside it, so a tool that fails
is seen (and logged) before the SDK turns the error into text for the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from agents import Agent, FunctionTool, Handoff
from flask import Flask

__all__ = ["SiteCode"]

T = TypeVar("T")

log = logging.getLogger("chatkit_flask")

ToolInvoker = Callable[[Any, str], Awaitable[Any]]
# Set by the Agents SDK on the invoker of a sync @function_tool (run in a worker thread).
_SYNC_TOOL_MARKER = "__agents_sync_function_tool__"


class SiteCode:
    """Runs site code inside a fresh app context of ``app`` (torn down after every call)."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``func(*args, **kwargs)`` inside a fresh app context."""
        with self.app.app_context():
            return func(*args, **kwargs)

    async def call_async(
        self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        """``await func(*args, **kwargs)`` inside a fresh app context, pushed and popped in the
        calling task (app contexts live in context variables: a sync tool the Agents SDK runs
        in a worker thread sees a copy of this context, and so the same app context)."""
        with self.app.app_context():
            return await func(*args, **kwargs)

    def agent(self, agent: Agent[Any]) -> Agent[Any]:
        """A copy of ``agent`` whose function tools run through :meth:`call_async`; agents it
        hands off to (``Agent`` or ``handoff(...)``) are copied the same way, and a handoff's
        ``on_handoff`` callback runs in an app context too. The site's objects are left as
        they are."""
        return self._agent(agent, {})

    def _agent(self, agent: Agent[Any], done: dict[int, Agent[Any]]) -> Agent[Any]:
        if id(agent) in done:  # handoffs may form a cycle
            return done[id(agent)]
        clone = agent.clone()
        done[id(agent)] = clone
        clone.tools = [self._tool(tool) for tool in agent.tools]
        clone.handoffs = [self._handoff(target, done) for target in agent.handoffs]
        return clone

    def _handoff(self, target: Any, done: dict[int, Agent[Any]]) -> Any:
        if isinstance(target, Agent):
            return self._agent(target, done)
        if not isinstance(target, Handoff):
            return target
        invoke = target.on_invoke_handoff

        async def on_invoke_handoff(ctx: Any, arguments: str) -> Agent[Any]:
            # The site's on_handoff callback runs here; the agent it hands to is wrapped too.
            return self._agent(await self.call_async(invoke, ctx, arguments), done)

        return dataclasses.replace(target, on_invoke_handoff=on_invoke_handoff)

    def _tool(self, tool: Any) -> Any:
        if not isinstance(tool, FunctionTool):
            return tool  # hosted tools (web search, ...) run at OpenAI, not here
        wrapped = copy.copy(tool)  # the SDK rebinds a fresh invoker to the copy
        invoker = wrapped.on_invoke_tool
        in_thread = bool(getattr(invoker, _SYNC_TOOL_MARKER, False))
        inner = getattr(invoker, "_invoke_tool_impl", None)
        if inner is not None:
            invoker._invoke_tool_impl = self._guard(  # type: ignore[attr-defined]
                tool.name, inner, in_thread
            )
        else:  # a FunctionTool built by hand: its own invoker is the site's code
            wrapped.on_invoke_tool = self._guard(tool.name, invoker, in_thread)
        return wrapped

    def _guard(self, name: str, invoke: ToolInvoker, in_thread: bool) -> ToolInvoker:
        async def guarded(ctx: Any, arguments: str) -> Any:
            try:
                if in_thread:
                    return await self.call_async(_to_the_end, invoke, ctx, arguments)
                return await self.call_async(invoke, ctx, arguments)
            except Exception as exc:
                # The tool's name and the exception's type only: arguments and messages can
                # hold what the visitor typed.
                log.warning(
                    "chatkit_flask: agent tool %s failed: %s [%s]",
                    name,
                    type(exc).__name__,
                    _request_id(ctx),
                )
                raise

        # Keeps the SDK's own markers on the implementation (argument preparation for approvals).
        return functools.update_wrapper(guarded, invoke)


async def _to_the_end(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``await func(*args)``; when cancelled, first wait for it to finish, then re-raise.

    For sync tools: the Agents SDK runs them in a worker thread, which a cancellation (the
    visitor left) cannot stop. The app context, and the database session the thread is using,
    must not be torn down under it; the thread's result is dropped.
    """
    task = asyncio.ensure_future(func(*args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):  # cancelled again: still wait
                await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at collection
        raise


def _request_id(ctx: Any) -> str:
    """The request id from a tool's context (``AgentContext.request_context``), if any."""
    request_context = getattr(getattr(ctx, "context", None), "request_context", None)
    return str(getattr(request_context, "request_id", "-"))
