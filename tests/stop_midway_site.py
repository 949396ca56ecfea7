"""A site's agent for tests/test_server_stop_midway.py's gunicorn test (CHATKIT_AGENT names it,
so the service's workers import it): one tool that shows a widget, starts filling another and
waits there until it is cancelled. It writes what happened into the folder
``STOP_MIDWAY_DIR`` names (the test runs in another process)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agents import Agent, RunContextWrapper, function_tool
from chatkit.agents import AgentContext
from chatkit.widgets import Card, Text, WidgetRoot


def _mark(name: str) -> None:
    (Path(os.environ["STOP_MIDWAY_DIR"]) / name).touch()


def card(text: str) -> Card:
    return Card(children=[Text(value=text)])


@function_tool
async def slow_search(ctx: RunContextWrapper[AgentContext[Any]]) -> str:
    """Search slowly."""
    await ctx.context.stream_widget(card("Found one result"))

    async def states() -> AsyncIterator[WidgetRoot]:
        yield card("Still searching...")
        _mark("waiting")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            _mark("cancelled")
            raise
        yield card("Done")

    await ctx.context.stream_widget(states())
    return "done"


agent = Agent(name="Site", model="gpt-test", instructions="Answer briefly.", tools=[slow_search])
