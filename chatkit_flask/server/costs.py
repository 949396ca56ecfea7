"""What one reply costs, before and after: the history bound, the estimate a reservation is
made of, and the meter that counts what a reply used even when it never finished.

Estimates count **4 characters per token** of what is sent (instructions + the history's model
input as JSON + the new message). English prose is about 4 characters a token and the JSON
structure around the text adds more characters than tokens, so the estimate errs high for text;
it is the figure a reservation is made of, never what a finished reply is charged.

A reply that does not finish (the visitor left, the deadline passed, the stream broke) is
charged, for each model call under way: the call's usage when the provider reported it
(``response.completed`` or ``response.incomplete``), else the estimated input plus the
characters of the deltas already received / 4.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agents import Agent

__all__ = [
    "CHARS_PER_TOKEN",
    "Charge",
    "ReplyMeter",
    "estimate_input_tokens",
    "model_calls",
    "newest_within",
]

CHARS_PER_TOKEN = 4
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})

Outcome = Literal["completed", "failed", "cancelled"]


def tokens_for(chars: int) -> int:
    return math.ceil(max(0, chars) / CHARS_PER_TOKEN)


def newest_within(items: Sequence[Any], max_chars: int) -> list[Any]:
    """The newest of ``items`` (oldest first, as sent) whose JSON together stays within
    ``max_chars``; the newest item (the message being answered) is always kept."""
    kept: list[Any] = []
    total = 0
    for item in reversed(items):
        size = len(item.model_dump_json())
        if kept and total + size > max_chars:
            break
        kept.append(item)
        total += size
    kept.reverse()
    return kept


IMAGE_TOKENS = 1600  # an attached image, at most (a 2048 px image at high detail is ~1,100)
FILE_BYTES_PER_TOKEN = 64  # an attached PDF: its text and page images, roughly


def estimate_input_tokens(agent: Agent[Any], agent_input: Sequence[Any]) -> int:
    """Input tokens of one model call: instructions (when a plain string; dynamic ones are not
    known before the call) plus the model input as JSON, at 4 characters a token, with each
    attachment at a flat estimate (its base64 is no measure of its tokens)."""
    instructions = agent.instructions if isinstance(agent.instructions, str) else ""
    attached = 0

    def without_data(value: Any) -> Any:
        nonlocal attached
        if isinstance(value, dict):
            if value.get("type") == "input_image" and "image_url" in value:
                attached += IMAGE_TOKENS
                return {**value, "image_url": ""}
            if value.get("type") == "input_file" and "file_data" in value:
                attached += max(IMAGE_TOKENS, len(value["file_data"]) * 3 // 4
                                // FILE_BYTES_PER_TOKEN)  # fmt: skip
                return {**value, "file_data": ""}
            return {key: without_data(item) for key, item in value.items()}
        if isinstance(value, list):
            return [without_data(item) for item in value]
        return value

    sent = json.dumps(without_data(list(agent_input)), ensure_ascii=False, default=str)
    return tokens_for(len(instructions) + len(sent)) + attached


def model_calls(agent: Agent[Any], max_turns: int) -> int:
    """Model calls one message may make: one without tools or handoffs (nothing can loop),
    else the run's ``max_turns``."""
    return max_turns if (agent.tools or agent.handoffs) else 1


@dataclass(frozen=True)
class Charge:
    """What a reply is charged: provider-reported tokens and the estimated rest."""

    input_tokens: int
    output_tokens: int
    estimated_tokens: int

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens + self.estimated_tokens


class ReplyMeter:
    """Counts one reply's model calls from the raw Responses events the Agents SDK relays.

    ``watch(result)`` gives an object to hand to ``stream_agent_response`` in place of the run
    result: it passes every event through and notes usage and deltas on the way.
    """

    def __init__(self, input_estimate: int) -> None:
        self.input_estimate = input_estimate
        self.reported_input = 0
        self.reported_output = 0
        self.finished_calls = 0
        self.in_flight = False  # a model call has started streaming and not ended
        self.delta_chars = 0  # received in the call under way
        self.timed_out = False
        self.incomplete_reason: str | None = None
        self.first_delta_at: float | None = None  # perf_counter() at the model's first delta

    def watch(self, result: Any) -> _Watched:
        return _Watched(result, self)

    def observe(self, event: Any) -> None:
        kind = getattr(event, "type", None)
        if kind == "response.created":
            self.in_flight, self.delta_chars = True, 0
        elif kind is not None and kind.endswith(".delta"):
            delta = getattr(event, "delta", None)
            if isinstance(delta, str):
                self.delta_chars += len(delta)
            if self.first_delta_at is None:
                self.first_delta_at = time.perf_counter()
        elif kind in _TERMINAL:
            response = getattr(event, "response", None)
            usage = getattr(response, "usage", None)
            if usage is not None:
                self.reported_input += usage.input_tokens or 0
                self.reported_output += usage.output_tokens or 0
                self.in_flight = False
            details = getattr(response, "incomplete_details", None)
            if kind == "response.incomplete" and details is not None:
                self.incomplete_reason = getattr(details, "reason", None) or "unknown"
            self.finished_calls += 1

    def charge(self, outcome: Outcome, sdk_usage: Any = None) -> Charge:
        """The reply's cost once it ended with ``outcome``; ``sdk_usage`` is the Agents SDK's
        own count (used when it is higher, e.g. a model that sends no raw events)."""
        reported_in = max(self.reported_input, getattr(sdk_usage, "input_tokens", 0) or 0)
        reported_out = max(self.reported_output, getattr(sdk_usage, "output_tokens", 0) or 0)
        # A visitor who leaves (or the deadline) may stop a call before its first event: the
        # request was sent, so its input is charged. A failure before any event (an HTTP error)
        # is not billed by the provider and is not charged.
        unfinished = self.in_flight or (
            (outcome == "cancelled" or self.timed_out) and self.finished_calls == 0
        )
        estimated = self.input_estimate + tokens_for(self.delta_chars) if unfinished else 0
        if outcome == "completed" and not self.timed_out:
            estimated = 0
        return Charge(reported_in, reported_out, estimated)


class _Watched:
    """A run result seen through a :class:`ReplyMeter` (only ``stream_events`` is used)."""

    def __init__(self, result: Any, meter: ReplyMeter) -> None:
        self._result = result
        self._meter = meter

    def stream_events(self) -> _MeteredEvents:
        return _MeteredEvents(self._result.stream_events(), self._meter)


class _MeteredEvents:
    """The run's events, each raw model event shown to the meter on the way."""

    def __init__(self, events: AsyncIterator[Any], meter: ReplyMeter) -> None:
        self._events = events
        self._meter = meter

    def __aiter__(self) -> _MeteredEvents:
        return self

    async def __anext__(self) -> Any:
        try:
            event = await self._events.__anext__()
        except StopAsyncIteration:
            # stream_agent_response reads us from a task of its own, which it abandons when
            # the visitor leaves; the run's cancel then ends that read here. Mark the task's
            # end as seen, or asyncio logs "Task exception was never retrieved".
            task = asyncio.current_task()
            if task is not None:
                task.add_done_callback(_seen)
            raise
        if getattr(event, "type", None) == "raw_response_event":
            self._meter.observe(event.data)
        return event


def _seen(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
