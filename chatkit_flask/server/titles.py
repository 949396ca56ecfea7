"""Thread titles: one short model call after a thread's first answer, with a fallback.

The call is made after the answer's last delta (never before its first), only for a thread with
no title, with a small ``max_output_tokens`` and a short timeout. When it fails, times out or
returns nothing usable, the title is the start of the first message. What it cost is charged
like the answer (see :class:`TitleCost`); a call that never reached the provider costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from agents import Agent, ModelSettings, RunConfig, Runner
from chatkit.types import ThreadItem, UserMessageItem

from .costs import tokens_for

__all__ = [
    "FALLBACK_CHARS",
    "TITLE_MAX_TOKENS",
    "TITLE_TIMEOUT",
    "TitleCost",
    "fallback_title",
    "first_message_text",
    "make_title",
    "title_reservation",
]

log = logging.getLogger(__name__)

TITLE_MAX_TOKENS = 20  # the Responses API's floor is 16
TITLE_TIMEOUT = 8.0  # seconds: the stream's end waits for it
TITLE_INPUT_CHARS = 1000  # of the first message: enough to name a topic
FALLBACK_CHARS = 50
MAX_MODEL_TITLE_CHARS = 80
_QUOTES = "\"' \u201c\u201d\u2018\u2019"
TITLE_INSTRUCTIONS = (
    "Write a title of at most six words for a conversation that begins with the user's "
    "message. Reply with the title only: no quotes, no final full stop."
)


@dataclass
class TitleCost:
    """Tokens of the title call, filled in as it goes (read even when it was cancelled)."""

    input_estimate: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    estimated_tokens: int = 0  # a call cut off after it was sent: its input, estimated
    requests: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens + self.estimated_tokens


def first_message_text(items: list[ThreadItem]) -> str:
    """The text of the oldest user message among ``items`` (oldest first), or ``""``."""
    for item in items:
        if isinstance(item, UserMessageItem):
            return " ".join(part.text for part in item.content).strip()
    return ""


def fallback_title(text: str) -> str:
    """The first ~50 characters of ``text``, cut at a word, with an ellipsis when cut."""
    words = " ".join(text.split())
    if len(words) <= FALLBACK_CHARS:
        return words or "New conversation"
    cut = words[:FALLBACK_CHARS].rsplit(" ", 1)[0] or words[:FALLBACK_CHARS]
    return cut.rstrip(" ,.;:") + "…"


def title_reservation(text: str) -> int:
    """The title call's worst case, reserved with the reply's."""
    sent = len(TITLE_INSTRUCTIONS) + min(len(text), TITLE_INPUT_CHARS)
    return tokens_for(sent) + TITLE_MAX_TOKENS


def _clean(output: Any) -> str:
    if not isinstance(output, str):
        return ""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    title = " ".join(lines[0].split()).strip(_QUOTES) if lines else ""
    return title.rstrip(".")[:MAX_MODEL_TITLE_CHARS]


async def make_title(
    text: str, model: Any, run_config: RunConfig, cost: TitleCost, request_id: str
) -> str:
    """A title for a thread whose first message is ``text``: the model's, else the fallback.
    ``cost`` is updated with what the call used (also when this is cancelled)."""
    prompt = text[:TITLE_INPUT_CHARS]
    cost.input_estimate = tokens_for(len(TITLE_INSTRUCTIONS) + len(prompt))
    run_config.model_settings = ModelSettings(max_tokens=TITLE_MAX_TOKENS)
    titler = Agent(name="Title", instructions=TITLE_INSTRUCTIONS, model=model)
    cost.requests = 1
    try:
        result = await asyncio.wait_for(
            Runner.run(titler, prompt, run_config=run_config, max_turns=1), TITLE_TIMEOUT
        )
    except asyncio.CancelledError:  # the visitor left: the request was sent, its input counts
        cost.estimated_tokens = cost.input_estimate
        raise
    except TimeoutError:
        cost.estimated_tokens = cost.input_estimate
        log.warning(
            "thread title: no answer within %g s; fallback used [%s]", TITLE_TIMEOUT, request_id
        )
        return fallback_title(text)
    except Exception as exc:  # an HTTP error is not billed; class only, never the body
        log.warning("thread title: %s; fallback used [%s]", type(exc).__name__, request_id)
        return fallback_title(text)
    usage = result.context_wrapper.usage
    cost.input_tokens, cost.output_tokens = usage.input_tokens, usage.output_tokens
    title = _clean(result.final_output)
    if not title:
        log.info("thread title: the model gave none; fallback used [%s]", request_id)
    return title or fallback_title(text)
