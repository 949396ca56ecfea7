"""The demo's own site code: one tool that shows a card of choices, and the action its buttons
send, handled through ``@chatkit.action`` like any site's.

Only the standalone service's demo uses it (``CHATKIT_DEMO`` on, server mode, no
``CHATKIT_AGENT``): the service calls :func:`register_demo_actions` before ``init_app``, and the
runtime then gives the plain agent the tool (:func:`with_demo_tool`). A site's own agent never
gets it. What the demo page shows of the card is in ``static/demo.js``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents import Agent, RunContextWrapper, function_tool
from chatkit.agents import AgentContext
from chatkit.errors import CustomStreamError
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageItem,
    HiddenContextItem,
    ThreadItemDoneEvent,
    ThreadItemReplacedEvent,
    ThreadStreamEvent,
    WidgetItem,
)
from chatkit.widgets import WidgetRoot, WidgetTemplate

from .actions import ActionContext
from .context import RequestContext

if TYPE_CHECKING:
    from ..extension import ChatKit

__all__ = [
    "CHOOSE_ACTION",
    "DEMO_INSTRUCTIONS",
    "choices_card",
    "offer_choices",
    "register_demo_actions",
    "with_demo_tool",
]

CHOOSE_ACTION = "demo.choose"
MAX_CHOICES = 4
MAX_LABEL_CHARS = 40
MAX_QUESTION_CHARS = 120
DEMO_INSTRUCTIONS = (
    "This is a demo. When the visitor asks to choose, vote, or see a widget, call offer_choices "
    "with a short question and two to four short choices instead of listing them in text."
)

_TEMPLATE = WidgetTemplate.from_file(str(Path(__file__).with_name("demo_choices.widget")))


def choices_card(question: str, choices: list[str], picked: str | None = None) -> WidgetRoot:
    """The card: ``question`` and a button per choice, or, once ``picked``, what was picked."""
    return _TEMPLATE.build(
        {"question": question, "choices": choices, "picked": picked, "action": CHOOSE_ACTION}
    )


def _short(text: str, limit: int) -> str:
    return " ".join(str(text).split())[:limit]


@function_tool
async def offer_choices(
    ctx: RunContextWrapper[AgentContext[RequestContext]], question: str, choices: list[str]
) -> str:
    """Show the visitor a card with a question and one button per choice (at most four).

    Args:
        question: The question, in a few words.
        choices: Two to four short labels.
    """
    labels = list(dict.fromkeys(_short(c, MAX_LABEL_CHARS) for c in choices if str(c).strip()))
    labels = labels[:MAX_CHOICES]
    if not labels:
        return "No card shown: give at least one choice."
    card = choices_card(_short(question, MAX_QUESTION_CHARS) or "Choose one", labels)
    await ctx.context.stream_widget(card, copy_text=" / ".join(labels))
    return "The card is shown; the visitor's pick will come as a note. Do not repeat the choices."


def with_demo_tool(agent: Agent[Any]) -> Agent[Any]:
    """A copy of ``agent`` that also has :func:`offer_choices` (and says when to use it)."""
    instructions = agent.instructions if isinstance(agent.instructions, str) else ""
    return agent.clone(
        instructions=f"{instructions}\n\n{DEMO_INSTRUCTIONS}".strip(),
        tools=[*agent.tools, offer_choices],
    )


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for child in node.get("children") or ():
            yield from _walk(child)


def _card_of(sender: WidgetItem | None) -> tuple[str, list[str]]:
    """The question and open choices of a demo card (stored, so the visitor cannot add any)."""
    if sender is None:
        return "", []
    question, choices = "", []
    for node in _walk(sender.widget.model_dump(exclude_none=True)):
        action = node.get("onClickAction") or {}
        if node.get("key") == "question":
            question = str(node.get("value", ""))
        elif node.get("type") == "Button" and action.get("type") == CHOOSE_ACTION:
            choices.append(str(node.get("label", "")))
    return question, choices


async def choose(ctx: ActionContext) -> AsyncIterator[ThreadStreamEvent]:
    """A button of the card: the card shows the pick, a short answer says it, and a hidden
    note tells the model on the next turn. No model call."""
    question, choices = _card_of(ctx.sender)
    picked = ctx.payload.get("choice") if isinstance(ctx.payload, dict) else None
    if not choices:
        raise CustomStreamError("This card has already been answered.", allow_retry=False)
    if picked not in choices:
        raise CustomStreamError("That is not one of the card's choices.", allow_retry=False)
    assert ctx.sender is not None  # choices came from it
    card = choices_card(question, choices, picked)
    yield ThreadItemReplacedEvent(item=ctx.sender.model_copy(update={"widget": card}))
    now = datetime.now()
    yield ThreadItemDoneEvent(
        item=AssistantMessageItem(
            id=ctx.new_item_id("message"),
            thread_id=ctx.thread.id,
            created_at=now,
            content=[AssistantMessageContent(text=f"You picked {picked}.")],
        )
    )
    note = json.dumps({"question": question, "picked": picked}, ensure_ascii=False)
    yield ThreadItemDoneEvent(  # stored, never sent to the browser (the SDK holds it back)
        item=HiddenContextItem(
            id=ctx.new_item_id("message"),
            thread_id=ctx.thread.id,
            created_at=now,
            content=f"<DEMO_CHOICE>{note}</DEMO_CHOICE>",
        )
    )


def register_demo_actions(chatkit: ChatKit) -> None:
    """Register the card's action on ``chatkit`` (the service's own extension object)."""
    chatkit.action(CHOOSE_ACTION)(choose)
