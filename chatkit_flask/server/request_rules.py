"""What a ChatKit request may be here, checked before the SDK or the model sees it.

The request types we serve (and which of them stream or cost a model call: the limiter and the
metrics ask before the body is parsed), the ids the stores could have issued, the caps, and the
refusals the endpoint turns into JSON errors or error events. Cheap checks without the SDK's
server: :mod:`.protocol` applies them to every parsed request.
"""

from __future__ import annotations

import json
import re

from chatkit.store import NotFoundError
from chatkit.types import (
    ChatKitReq,
    StructuredInputSubmission,
    ThreadsListReq,
    UserMessageInput,
    UserMessageTagContent,
)

__all__ = [
    "ATTACHMENT_ID",
    "ATTACHMENT_TYPES",
    "ITEM_ID",
    "MAX_ACTION_PAYLOAD_BYTES",
    "MAX_FEEDBACK_ITEMS",
    "MAX_PAGE_SIZE",
    "MAX_TITLE_CHARS",
    "MODEL_TYPES",
    "STREAMING_TYPES",
    "SUPPORTED_TYPES",
    "THREAD_ID",
    "UNSUPPORTED_TYPES",
    "ActionFailed",
    "AudioTooLarge",
    "InputTooLong",
    "InvalidRequest",
    "RequestRefused",
    "StaleToolOutput",
    "TooManyAttachments",
    "ToolOutputTooLarge",
    "UnsupportedAction",
    "UnsupportedRequest",
    "calls_model",
    "check_ids",
    "input_chars",
    "refuse_unsupported",
    "request_type",
    "streams",
    "structured_input_chars",
]

STREAMING_TYPES = frozenset(
    {
        "threads.create",
        "threads.add_user_message",
        "threads.retry_after_item",
        "threads.custom_action",
        "threads.add_structured_input",
        "threads.add_client_tool_output",
    }
)
# Every stream we serve may call the model (a streaming action's handler may start a model
# turn: it counts as a message whether or not it does; a client tool's output continues the
# run); reads and sync actions never do. Dictation is a model call too (a transcription),
# answered with JSON.
MODEL_TYPES = STREAMING_TYPES | {"input.transcribe"}
SUPPORTED_TYPES = MODEL_TYPES | {
    "threads.sync_custom_action",
    "threads.get_by_id",
    "threads.list",
    "items.list",
    "threads.update",
    "threads.delete",
    "items.feedback",
}
# Served only when the server has attachments (CHATKIT_ATTACHMENTS); refused otherwise.
ATTACHMENT_TYPES = frozenset({"attachments.create", "attachments.delete"})
# ChatKit types we refuse: uploads unless attachments are on, and dictation unless it is on
# (see parse).
UNSUPPORTED_TYPES = frozenset(
    {
        "attachments.create",
        "attachments.delete",
    }
)
MAX_PAGE_SIZE = 100
# Ids as the store issues them (store.py): a thread id is "thr_" + 128 random bits in hex. Item
# ids are ours or the model's ("msg_..."); both are word characters. Anything else (a key
# separator, a path) is a 404 before the store is touched.
THREAD_ID = re.compile(r"thr_[0-9a-f]{32}")
ITEM_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
ATTACHMENT_ID = re.compile(r"atc_[0-9a-f]{32}")
MAX_TITLE_CHARS = 200
MAX_FEEDBACK_ITEMS = 100
MAX_ACTION_PAYLOAD_BYTES = 16 * 1024  # an action's payload, as compact JSON


# --------------------------------------------------------------------- errors
class RequestRefused(Exception):
    """A request we answer with ``status`` (400) before doing anything; ``code`` is the JSON
    error code."""

    code = "invalid_request"
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(RequestRefused):
    """Not JSON, not a ChatKit request, or fields of the wrong shape."""


class UnsupportedRequest(RequestRefused):
    """A valid ChatKit request type this server does not serve (attachments, tools, ...)."""

    code = "unsupported_request"


class UnsupportedAction(RequestRefused):
    """A widget action no handler is registered for (or not for this request type)."""

    code = "unsupported_action"


class ActionFailed(Exception):
    """A site's sync action handler raised; logged by class only (500 ``action_failed``)."""


class TooManyAttachments(RequestRefused):
    """More attachments in one message than ``CHATKIT_ATTACHMENTS_PER_MESSAGE``."""

    code = "too_many_attachments"


class InputTooLong(RequestRefused):
    """The user message is longer than ``max_input_chars``; the model was not called."""

    code = "input_too_long"


class ToolOutputTooLarge(RequestRefused):
    """A client tool's output is longer than ``client_tool_max_chars`` (as JSON); the pending
    call stays pending and the model was not called."""

    code = "tool_output_too_large"


class StaleToolOutput(Exception):
    """A client tool output for a thread that waits on no client tool call (none was asked, it
    was answered already, or a message came after it): 409, nothing stored, no model call."""


class AudioTooLarge(RequestRefused):
    """A recording larger than dictation's cap; the model was not called (413)."""

    code = "audio_too_large"
    status = 413


# ----------------------------------------------------------------- classifier
def request_type(body: bytes | str) -> str | None:
    """The ``type`` of a ChatKit request body, or None when there is none (cheap; no pydantic)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def streams(kind: str | None) -> bool:
    """True for the types answered with an event stream."""
    return kind in STREAMING_TYPES


def calls_model(kind: str | None) -> bool:
    """True for the types that cost a model call (count these against message limits)."""
    return kind in MODEL_TYPES


def refuse_unsupported(kind: str | None, attachments: bool = False) -> None:
    if kind in UNSUPPORTED_TYPES and not (attachments and kind in ATTACHMENT_TYPES):
        raise UnsupportedRequest(f"Requests of type {kind!r} are not supported here.")


def input_chars(user_input: UserMessageInput) -> int:
    """Characters of everything in a message that is stored or reaches the model: text parts,
    tags (their text and their data, as JSON) and the quoted text. The one count the input
    cap applies to."""
    length = len(user_input.quoted_text or "")
    for part in user_input.content:
        length += len(part.text)
        if isinstance(part, UserMessageTagContent):
            length += len(json.dumps(part.data, separators=(",", ":"))) + len(part.id)
            length += len(part.group or "")
    return length


def structured_input_chars(submission: StructuredInputSubmission) -> int:
    """Characters of a structured input's answers as the model reads them (each question's id
    and its values joined by ", "): counted against the same cap as a message."""
    return sum(
        len(question_id) + len(", ".join(answer.values))
        for question_id, answer in submission.answers.items()
    )


def check_ids(request: ChatKitReq) -> None:
    """A thread or item id the store could not have issued is ``NotFoundError`` (404)."""
    params = getattr(request, "params", None)
    thread_ids = [getattr(params, "thread_id", None)]
    item_ids = [getattr(params, "item_id", None), *getattr(params, "item_ids", ())]
    # ``after`` is a paging cursor: a thread id in threads.list, an item id in items.list.
    (thread_ids if isinstance(request, ThreadsListReq) else item_ids).append(
        getattr(params, "after", None)
    )
    for ident, pattern in [(i, THREAD_ID) for i in thread_ids] + [(i, ITEM_ID) for i in item_ids]:
        if ident is not None and not pattern.fullmatch(ident):
            raise NotFoundError("no such thread or item")
