"""The ChatKit protocol, served by OpenAI's ChatKit SDK with an Agents SDK agent.

:class:`FlaskChatKitServer` adds to the SDK what a public site needs: one cached request parser
(the SDK builds a pydantic ``TypeAdapter`` per request: about 3 ms of CPU), refusal of the request
types we do not serve, an input length limit checked before any model call, history taken from
the NEWEST items (as many as fit ``history_max_chars``), a generic message instead of the
provider's error body, the model request aborted when the visitor goes away or the reply's
deadline passes (the partial answer kept), ``max_output_tokens`` and ``max_turns`` on every run,
a reservation of the reply's worst-case cost before the model is called (``admit``), and its
real cost reported per answer, cancelled ones included (see ``costs``), and a title for a
thread after its first answer (see ``titles``), its cost in the same report. Structured input
is capped and counted like a message; dictation (see ``dictation``) is refused unless it is on.
A client tool call (a tool that sets ``ctx.context.client_tool_call``) ends the stream; the
browser's output (``threads.add_client_tool_output``) is taken only for the thread's pending
call, size-capped, and continues the run like a message.

What a request may be (its types, ids and caps, and the refusals) is :mod:`.request_rules`.

Built against openai-chatkit 1.6.x: :meth:`stream` and :meth:`call` use the SDK's
``_process_streaming_impl`` / ``_process_non_streaming`` to skip its per-call parser (pinned range).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from agents import Agent, ModelSettings, RunConfig, Runner
from chatkit.actions import Action
from chatkit.agents import AgentContext, stream_agent_response
from chatkit.errors import CustomStreamError
from chatkit.server import ChatKitServer, NonStreamingResult, StreamingResult
from chatkit.store import NotFoundError, Store
from chatkit.types import (
    AssistantMessageItem,
    AttachmentsDeleteReq,
    AudioInput,
    ChatKitReq,
    ClientToolCallItem,
    ErrorEvent,
    FeedbackKind,
    InputTranscribeParams,
    InputTranscribeReq,
    ItemsFeedbackReq,
    ItemsListReq,
    SDKHiddenContextItem,
    StructuredInputItem,
    StructuredInputSubmission,
    SyncCustomActionResponse,
    ThreadItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemUpdatedEvent,
    ThreadMetadata,
    ThreadsAddClientToolOutputReq,
    ThreadsAddStructuredInputReq,
    ThreadsAddUserMessageReq,
    ThreadsCreateReq,
    ThreadsCustomActionReq,
    ThreadsDeleteReq,
    ThreadsListReq,
    ThreadsSyncCustomActionReq,
    ThreadStreamEvent,
    ThreadsUpdateReq,
    TranscriptionResult,
    UserMessageInput,
    UserMessageItem,
    WidgetItem,
    is_streaming_req,
)
from openai import RateLimitError
from pydantic import TypeAdapter, ValidationError

from ..state import RegisteredAction
from .actions import ActionContext
from .agent import AgentSource, ModelClient, resolve_agent
from .attachments import AttachmentConverter, AttachmentNotFound, AttachmentRefused, Attachments
from .context import RequestContext
from .costs import ReplyMeter, estimate_input_tokens, model_calls, newest_within
from .dictation import AUDIO_TYPES, Dictation, DictationFailed, reservation_tokens
from .request_rules import (
    ATTACHMENT_ID,
    ATTACHMENT_TYPES,
    MAX_ACTION_PAYLOAD_BYTES,
    MAX_FEEDBACK_ITEMS,
    MAX_PAGE_SIZE,
    MAX_TITLE_CHARS,
    MODEL_TYPES,
    STREAMING_TYPES,
    SUPPORTED_TYPES,
    UNSUPPORTED_TYPES,
    ActionFailed,
    AudioTooLarge,
    InputTooLong,
    InvalidRequest,
    RequestRefused,
    StaleToolOutput,
    ToolOutputTooLarge,
    TooManyAttachments,
    UnsupportedAction,
    UnsupportedRequest,
    calls_model,
    check_ids,
    input_chars,
    refuse_unsupported,
    request_type,
    streams,
    structured_input_chars,
)
from .sitecode import SiteCode
from .store_guard import GuardedStore, StoreFailed
from .titles import TitleCost, first_message_text, make_title, title_reservation

__all__ = [
    "ATTACHMENT_TYPES",
    "MAX_ACTION_PAYLOAD_BYTES",
    "MODEL_TYPES",
    "STREAMING_TYPES",
    "SUPPORTED_TYPES",
    "UNSUPPORTED_TYPES",
    "ActionFailed",
    "AttachmentRefused",
    "AudioTooLarge",
    "DictationFailed",
    "FlaskChatKitServer",
    "InputTooLong",
    "InvalidRequest",
    "NotFoundError",
    "OverBudget",
    "RequestRefused",
    "StaleToolOutput",
    "StoreFailed",
    "TokenUsage",
    "TooManyAttachments",
    "ToolOutputTooLarge",
    "UnsupportedAction",
    "UnsupportedRequest",
    "calls_model",
    "request_type",
    "streams",
]

log = logging.getLogger(__name__)

BUSY_MESSAGE = "The assistant is busy right now. Please try again in a moment."
FAILED_MESSAGE = "The assistant could not answer just now. Please try again."
TIMEOUT_MESSAGE = "The answer took too long and was stopped. Please try again."
CUT_MESSAGE = "The answer reached its length limit and was cut short."
# Stored (hidden from the visitor) after an answer that was cut short, for the next turn.
CUT_NOTE = "The previous answer was cut off before it was finished."

# Built once: building it per request is a quarter of the server's CPU per message.
_REQUEST_ADAPTER: TypeAdapter[ChatKitReq] = TypeAdapter(ChatKitReq)


# ---------------------------------------------------------------------- usage
@dataclass(frozen=True)
class TokenUsage:
    """Tokens one answer used, as the provider reported them (zeros if it never finished),
    and ``charged_tokens``: what the budgets are charged (reported, plus an estimate for a
    model call cut off before its usage came; see ``costs``)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    requests: int
    outcome: Literal["completed", "failed", "cancelled"]
    charged_tokens: int = 0


class OverBudget(Exception):
    """A token budget of the caller's is spent (``admit`` refused): ``message`` in the visitor's
    words, the budget's ``scope`` and the seconds until it resets. A reply shows it as an
    ``error`` event; dictation answers 429 ``token_budget``, as the view's own check does."""

    def __init__(self, message: str, scope: str, retry_after: int) -> None:
        super().__init__(scope)
        self.message = message
        self.scope = scope
        self.retry_after = retry_after


# Called on the loop with the worst-case tokens of a reply (or a recording) before the model is;
# raises OverBudget to refuse.
AdmitCallback = Callable[[RequestContext, int], Awaitable[None]]


UsageCallback = Callable[[RequestContext, TokenUsage], None]


def _log_action_failure(name: str, exc: Exception, context: RequestContext) -> None:
    """The action's name (registered, so the site's own word) and the exception's class only."""
    log.warning("action %s failed: %s [%s]", name, type(exc).__name__, context.request_id)


def _release_event_reader(agent_context: AgentContext[RequestContext]) -> None:
    """Cancel the task ``stream_agent_response`` leaves waiting on the context's event queue
    when a run fails or is cancelled (else it lingers until garbage collection, then logs
    "Task was destroyed but it is pending!" for every disconnect)."""
    for waiter in list(getattr(agent_context._events, "_getters", ())):
        waiter.cancel()


def _stop_at_deadline(result: Any, meter: ReplyMeter) -> None:
    """The reply's deadline: abort the model call; its stream then ends and ``respond`` tells
    the visitor (a trickling reply never trips the per-read timeout)."""
    if result.is_complete:  # the answer is whole; only its last frames are still going out
        return
    meter.timed_out = True
    result.cancel()


# --------------------------------------------------------------------- server
class FlaskChatKitServer(ChatKitServer[RequestContext]):
    """The ChatKit server for one site.

    ``store`` must scope every read and write by ``context.owner`` (another owner's thread is
    ``NotFoundError``). ``agent`` is an ``Agent`` or a per-request factory. ``model`` gives the
    ``AsyncOpenAI`` client; without it the agent's own model (or the Agents SDK default) is used.
    ``on_usage(context, usage)`` runs on the event loop after every answer (must not block;
    its errors are logged, never raised). ``history_items`` is the number of newest thread items
    sent to the model; each costs CPU in the openai client's request transform (measured: about
    16-21 ms per message with 1 item, 30 ms with 30); ``history_max_chars`` bounds their JSON.
    ``max_output_tokens`` and ``max_turns`` bound every run; ``reply_timeout`` (seconds) bounds
    a whole reply. ``admit(context, tokens)`` is awaited before the model is called. With
    ``titles``, a thread without a title gets one after its first answer, from ``title_model``
    (None: the agent's model), or the start of its first message. With ``site``, the agent
    factory and every function tool run inside a fresh app context of the host app (see
    :class:`~chatkit_flask.server.sitecode.SiteCode`).
    """

    def __init__(
        self,
        store: Store[RequestContext],
        agent: AgentSource,
        model: ModelClient | None = None,
        *,
        history_items: int = 20,
        max_input_chars: int = 4000,
        on_usage: UsageCallback | None = None,
        history_max_chars: int = 32_000,
        max_output_tokens: int = 1024,
        max_turns: int = 4,
        reply_timeout: float = 180.0,
        admit: AdmitCallback | None = None,
        site: SiteCode | None = None,
        actions: Mapping[str, RegisteredAction] | None = None,
        titles: bool = False,
        title_model: str | None = None,
        client_tool_max_chars: int = 8000,
        attachments: Callable[[Store[RequestContext]], Attachments] | None = None,
        dictation: Dictation | None = None,
    ) -> None:
        super().__init__(GuardedStore(store))
        # Built on the guarded store: attachment metadata fails in words like threads do.
        self.attachments = attachments(self.store) if attachments is not None else None
        self.attachment_store = self.attachments
        self.site = site
        self.actions: Mapping[str, RegisteredAction] = actions if actions is not None else {}
        # A fixed agent is wrapped once; a factory's agent on every request.
        self.agent = site.agent(agent) if site is not None and isinstance(agent, Agent) else agent
        self.model = model
        self.history_items = history_items
        self.max_input_chars = max_input_chars
        self.on_usage = on_usage
        self.history_max_chars = history_max_chars
        self.max_output_tokens = max_output_tokens
        self.max_turns = max_turns
        self.reply_timeout = reply_timeout
        self.admit = admit
        self.titles = titles
        self.title_model = title_model
        self.client_tool_max_chars = client_tool_max_chars
        self.dictation = dictation
        self.converter = AttachmentConverter(self.attachments)

    # ------------------------------------------------------------- parsing
    def parse(self, body: bytes | str) -> ChatKitReq:
        """Validate ``body`` into a request we serve, or raise a :class:`RequestRefused`."""
        # Checked first, so a type we refuse is named as such even when its params are malformed
        # (and a large dictation or upload body is not validated for nothing).
        on = self.attachments is not None
        kind = request_type(body)
        refuse_unsupported(kind, on)
        if kind == "input.transcribe" and self.dictation is None:
            raise UnsupportedRequest("Dictation is off on this site.")
        try:
            request = _REQUEST_ADAPTER.validate_json(body)
        except ValidationError:
            raise InvalidRequest("The request is not a valid ChatKit request.") from None
        refuse_unsupported(request.type, on)
        served = SUPPORTED_TYPES | ATTACHMENT_TYPES if on else SUPPORTED_TYPES
        if request.type not in served:  # a type added by a newer SDK
            raise UnsupportedRequest(f"Requests of type {request.type!r} are not supported here.")
        self._check(request)
        return request

    def _check(self, request: ChatKitReq) -> None:
        if isinstance(request, ThreadsCustomActionReq | ThreadsSyncCustomActionReq):
            # Before the ids: an action nobody handles is refused as such, for any thread.
            sync = isinstance(request, ThreadsSyncCustomActionReq)
            self._check_action(request.params.action, sync)
        check_ids(request)
        match request:
            case ThreadsCreateReq() | ThreadsAddUserMessageReq():
                self._check_input(request.params.input)
            case ThreadsAddClientToolOutputReq():
                self._check_tool_output(request.params.result)
            case ThreadsAddStructuredInputReq():
                if structured_input_chars(request.params.input) > self.max_input_chars:
                    raise InputTooLong(
                        f"Answers have at most {self.max_input_chars} characters in all."
                    )
            case InputTranscribeReq():
                self._check_audio(request.params)
            case ThreadsListReq() | ItemsListReq():
                # The client chooses the page size; a huge one would load a whole history. 0 or
                # none is the SDK's default page (20), as OpenAI's own server answers it.
                limit = request.params.limit
                request.params.limit = max(1, min(limit, MAX_PAGE_SIZE)) if limit else None
            case ThreadsUpdateReq() if len(request.params.title) > MAX_TITLE_CHARS:
                raise InvalidRequest(f"A title has at most {MAX_TITLE_CHARS} characters.")
            case ItemsFeedbackReq() if len(request.params.item_ids) > MAX_FEEDBACK_ITEMS:
                raise InvalidRequest(f"Feedback names at most {MAX_FEEDBACK_ITEMS} items.")
            case AttachmentsDeleteReq() if not ATTACHMENT_ID.fullmatch(
                request.params.attachment_id
            ):
                raise AttachmentNotFound("no such attachment")

    def _check_action(self, action: Action[str, Any], sync: bool) -> None:
        name = action.type if isinstance(action.type, str) else ""  # the SDK lets it be unset
        registered = self.actions.get(name)
        if registered is None or registered.sync != sync:
            # The name is not echoed: an unknown one is the caller's text.
            raise UnsupportedAction("This site has no handler for that action.")
        size = len(json.dumps(action.payload, separators=(",", ":")).encode())
        if size > MAX_ACTION_PAYLOAD_BYTES:
            raise InvalidRequest(
                f"An action's payload has at most {MAX_ACTION_PAYLOAD_BYTES} bytes of JSON."
            )

    def _check_tool_output(self, result: Any) -> None:
        # Counted as the JSON the model will be sent (characters, not bytes, like a message).
        try:
            size = len(json.dumps(result, ensure_ascii=False, separators=(",", ":")))
        except (ValueError, RecursionError):
            raise InvalidRequest("A client tool's output must be plain JSON.") from None
        if size > self.client_tool_max_chars:
            raise ToolOutputTooLarge(
                f"A client tool's output has at most {self.client_tool_max_chars} characters "
                "of JSON."
            )

    def _check_audio(self, params: InputTranscribeParams) -> None:
        if self.dictation is None:  # parse refused it already; a subclass may call us
            raise UnsupportedRequest("Dictation is off on this site.")
        if params.mime_type.split(";", 1)[0].strip().lower() not in AUDIO_TYPES:
            raise InvalidRequest("Dictation takes " + ", ".join(AUDIO_TYPES) + " recordings.")
        limit = self.dictation.max_bytes
        too_large = AudioTooLarge(f"A recording has at most {limit / 1_000_000:g} MB.")
        if len(params.audio_base64) > 4 * ((limit + 2) // 3) + 4:  # before decoding it
            raise too_large
        try:
            size = len(base64.b64decode(params.audio_base64, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidRequest("The recording is not valid base64.") from None
        if size == 0:
            raise InvalidRequest("The recording is empty.")
        if size > limit:
            raise too_large

    def _check_input(self, user_input: UserMessageInput) -> None:
        if user_input.attachments and self.attachments is None:
            raise UnsupportedRequest("Attachments are not supported here.")
        if self.attachments is not None:
            most = self.attachments.policy.per_message
            if len(user_input.attachments) > most:
                raise TooManyAttachments(f"A message may have at most {most} attachments.")
            for attachment_id in user_input.attachments:
                if not ATTACHMENT_ID.fullmatch(attachment_id):
                    raise AttachmentNotFound("no such attachment")
        if input_chars(user_input) > self.max_input_chars:
            raise InputTooLong(f"A message has at most {self.max_input_chars} characters.")
        # inference_options (model, tool_choice) are ignored on purpose: the browser must not
        # pick the model the site pays for.

    # ---------------------------------------------------------- processing
    @staticmethod
    def is_streaming(request: ChatKitReq) -> bool:
        return is_streaming_req(request)

    async def stream(self, request: ChatKitReq, context: RequestContext) -> AsyncIterator[bytes]:
        """SSE frames (``b"data: {...}\\n\\n"``) for a streaming request.

        ``NotFoundError`` for a missing or foreign thread is raised before the first frame.
        Not the SDK's ``StreamingResult``: its wrapper generator would stop a cancellation from
        landing inside the SDK (where ``handle_stream_cancelled`` keeps the partial answer), and
        its ``_process_streaming`` logs every 404 as an ERROR with a traceback.
        """
        if isinstance(request, ThreadsAddClientToolOutputReq):
            await self._check_pending_tool_call(request.params.thread_id, context)
        if self.attachments is not None and isinstance(
            request, ThreadsCreateReq | ThreadsAddUserMessageReq
        ):
            # Before the first frame (the SDK loads them after "thread.created"): another
            # visitor's attachment is a 404, one not uploaded a 400, and no thread is made.
            thread_id = getattr(request.params, "thread_id", None)
            await self.attachments.check_message(
                request.params.input.attachments, thread_id, context
            )
        events = self._process_streaming_impl(request, context)  # type: ignore[arg-type]
        last: ThreadStreamEvent | None = None
        try:
            async for event in events:
                last = event
                yield b"data: " + self._serialize(event) + b"\n\n"
        except StoreFailed as exc:
            # Raised between the SDK's steps (saving the visitor's message, the thread's last
            # update): after the first frame it must end the stream in words, not cut it.
            if last is None:
                raise  # nothing sent yet: the endpoint answers 503
            if not isinstance(last, ErrorEvent):
                error = ErrorEvent(code="custom", message=exc.message, allow_retry=True)
                yield b"data: " + self._serialize(error) + b"\n\n"

    async def _check_pending_tool_call(self, thread_id: str, context: RequestContext) -> None:
        """Raise :class:`StaleToolOutput` unless the owner's thread waits on a client tool call:
        its newest item is a pending one (the item the SDK then completes; its own check raises a
        bare ValueError, a 400 that does not say why). Another owner's thread is
        ``NotFoundError``."""
        await self.store.load_thread(thread_id, context=context)
        newest = await self.store.load_thread_items(thread_id, None, 1, "desc", context)
        item = newest.data[0] if newest.data else None
        if not isinstance(item, ClientToolCallItem) or item.status != "pending":
            raise StaleToolOutput

    async def call(self, request: ChatKitReq, context: RequestContext) -> bytes:
        """The JSON answer to a non-streaming request (``NotFoundError`` if not the owner's)."""
        if self.attachments is not None and isinstance(request, ThreadsDeleteReq):
            # The store forgets the thread; its attachments' bytes must go with it.
            await self.attachments.forget_thread(request.params.thread_id, context)
        return await self._process_non_streaming(request, context)  # type: ignore[arg-type]

    async def process(
        self, request: str | bytes | bytearray, context: RequestContext
    ) -> StreamingResult | NonStreamingResult:
        """The SDK's entry point, with our parser and checks (raises :class:`RequestRefused`)."""
        parsed = self.parse(bytes(request) if isinstance(request, bytearray) else request)
        if self.is_streaming(parsed):
            return StreamingResult(self.stream(parsed, context))  # type: ignore[arg-type]
        return NonStreamingResult(await self.call(parsed, context))

    async def add_feedback(
        self, thread_id: str, item_ids: list[str], feedback: FeedbackKind, context: RequestContext
    ) -> None:
        # The SDK accepts feedback on any thread id; only the owner may give it.
        await self.store.load_thread(thread_id, context=context)
        log.info("feedback %s on %d item(s) [%s]", feedback, len(item_ids), context.request_id)

    async def transcribe(
        self, audio_input: AudioInput, context: RequestContext
    ) -> TranscriptionResult:
        """Dictation, checked by :meth:`parse`: the recording's worst case is reserved before
        the call (:class:`OverBudget` refuses it), then settled like an answer's tokens."""
        assert self.dictation is not None  # parse refuses input.transcribe when it is off
        reserved = reservation_tokens(len(audio_input.data))
        if self.admit is not None:
            await self.admit(context, reserved)
        try:
            transcript = await self.dictation.transcribe(audio_input, context.request_id)
        except DictationFailed:  # refused by the provider: not charged, the reservation freed
            self._report(context, TokenUsage(0, 0, 0, 1, "failed"))
            raise
        except BaseException:  # cut short (a timeout): the recording was sent, charged as reserved
            self._report(context, TokenUsage(0, 0, 0, 1, "cancelled", reserved))
            raise
        tokens = transcript.input_tokens + transcript.output_tokens
        usage = TokenUsage(
            transcript.input_tokens, transcript.output_tokens, tokens, 1, "completed", tokens
        )
        self._report(context, usage)
        return TranscriptionResult(text=transcript.text)

    async def _apply_structured_input_submission(
        self, item: StructuredInputItem, submission: StructuredInputSubmission
    ) -> StructuredInputItem:
        # Answers to questions the item does not ask are dropped here: the SDK would log their
        # ids, which are the caller's text. (Not pending: the SDK's ValueError, a 400.)
        asked = {question.id for question in item.inputs}
        answers = {key: value for key, value in submission.answers.items() if key in asked}
        submission = submission.model_copy(update={"answers": answers})
        return await super()._apply_structured_input_submission(item, submission)

    # ------------------------------------------------------------- actions
    async def action(
        self,
        thread: ThreadMetadata,
        action: Action[str, Any],
        sender: WidgetItem | None,
        context: RequestContext,
    ) -> AsyncIterator[ThreadStreamEvent]:
        # The SDK loaded thread and sender through the owner-scoped store: a foreign one was a
        # 404 before this runs. Each step of the site's generator runs in an app context.
        events = self.actions[action.type].handler(
            ActionContext(thread, action, sender, context, self)
        )
        try:
            while True:
                try:
                    if self.site is None:
                        event = await anext(events)
                    else:
                        event = await self.site.call_async(anext, events)
                except StopAsyncIteration:
                    return
                except (CustomStreamError, StoreFailed):  # a model turn's, already in words
                    raise
                except Exception as exc:
                    # Not the SDK's log line: it prints the exception's text, which may quote
                    # the site's data or a visitor's message.
                    _log_action_failure(action.type, exc, context)
                    raise CustomStreamError(FAILED_MESSAGE, allow_retry=True) from None
                yield event
        finally:
            await events.aclose()

    async def sync_action(
        self,
        thread: ThreadMetadata,
        action: Action[str, Any],
        sender: WidgetItem | None,
        context: RequestContext,
    ) -> SyncCustomActionResponse:
        handler = self.actions[action.type].handler
        action_context = ActionContext(thread, action, sender, context, self)
        try:
            if self.site is None:
                updated = await handler(action_context)
            else:
                updated = await self.site.call_async(handler, action_context)
        except (NotFoundError, StoreFailed):
            raise
        except Exception as exc:
            _log_action_failure(action.type, exc, context)
            raise ActionFailed from None
        if updated is not None:
            await self.store.save_item(thread.id, updated, context=context)
        return SyncCustomActionResponse(updated_item=updated)

    # ------------------------------------------------------------- answers
    async def respond(
        self,
        thread: ThreadMetadata,
        input_user_message: UserMessageItem | None,
        context: RequestContext,
    ) -> AsyncIterator[ThreadStreamEvent]:
        agent = self._agent_for(context)
        # The NEWEST items, oldest first (the quickstart's order="asc" sends the oldest ones).
        page = await self.store.load_thread_items(
            thread.id, None, self.history_items, "desc", context
        )
        history = newest_within(list(reversed(page.data)), self.history_max_chars)
        agent_input = await self.converter.to_agent_input(history)
        agent_context = AgentContext(thread=thread, store=self.store, request_context=context)
        meter = ReplyMeter(estimate_input_tokens(agent, agent_input))
        # Only an untitled thread: a title the visitor (or an earlier answer) set stays.
        title_text: str | None = None
        if self.titles and thread.title is None:
            first = [*history, *([input_user_message] if input_user_message else [])]
            title_text = first_message_text(first) or None
        title_cost = TitleCost()
        if self.admit is not None:
            calls = model_calls(agent, self.max_turns)
            reserve = calls * (meter.input_estimate + self.max_output_tokens)
            if title_text is not None:
                reserve += title_reservation(title_text)
            try:
                await self.admit(context, reserve)
            except OverBudget as spent:
                raise CustomStreamError(spent.message, allow_retry=True) from None
        context.report["model_called_at"] = time.perf_counter()
        result = Runner.run_streamed(
            agent,
            agent_input,
            context=agent_context,
            run_config=self._run_config(agent),
            max_turns=self.max_turns,
        )
        deadline = asyncio.get_running_loop().call_later(
            self.reply_timeout, _stop_at_deadline, result, meter
        )
        pending: dict[str, ThreadItem] = {}  # what is on screen but not saved yet
        outcome: Literal["completed", "failed", "cancelled"] = "cancelled"
        try:
            async for event in stream_agent_response(agent_context, meter.watch(result)):
                # The model's first output: what a visitor waits for (the frames before it,
                # thread and user item, leave before the model is called).
                context.report.setdefault("first_answer_at", time.perf_counter())
                self._follow(pending, event)
                yield event
            if meter.timed_out:  # the run was stopped: its stream just ends
                raise TimeoutError
            outcome = "completed"
            if title_text is not None:  # after the last delta: the answer never waits for it
                await self._set_title(thread, title_text, agent, context, title_cost)
        except StoreFailed:  # logged by the store guard; the SDK shows its message
            outcome = "failed"
            raise
        except Exception as exc:
            outcome = "failed"
            allow_retry = True
            if meter.timed_out or meter.incomplete_reason == "max_output_tokens":
                message = TIMEOUT_MESSAGE if meter.timed_out else CUT_MESSAGE
                allow_retry = meter.timed_out
                log.warning("model answer cut: %s [%s]", message, context.request_id)
            else:
                # Class and status only: provider messages can quote parts of keys or inputs.
                log.warning(
                    "model answer failed: %s status=%s [%s]",
                    type(exc).__name__,
                    getattr(exc, "status_code", "-"),
                    context.request_id,
                )
                message = BUSY_MESSAGE if isinstance(exc, RateLimitError) else FAILED_MESSAGE
            for event in self._keep_cut_answer(thread, pending, context):
                yield event  # what the visitor has already read stays in the thread
            raise CustomStreamError(message, allow_retry=allow_retry) from None
        finally:
            # For the log line (written when the stream closes): the model's first delta in.
            context.report["model_delta_at"] = meter.first_delta_at
            deadline.cancel()
            # Without this the model request runs to its end after a disconnect (and is paid
            # for): stream_agent_response waits on tasks that cancelling us does not cancel.
            result.cancel()
            if outcome != "completed":
                _release_event_reader(agent_context)
            self._report_usage(context, result.context_wrapper.usage, outcome, meter, title_cost)

    def _run_config(self, agent: Any) -> RunConfig:
        """The model client's run config with ``max_output_tokens`` (an agent's own lower
        ``max_tokens`` stands)."""
        config = self.model.run_config() if self.model is not None else RunConfig()
        own = agent.model_settings.max_tokens
        limit = self.max_output_tokens if own is None else min(own, self.max_output_tokens)
        config.model_settings = (config.model_settings or ModelSettings()).resolve(
            ModelSettings(max_tokens=limit)
        )
        return config

    def _follow(self, pending: dict[str, ThreadItem], event: ThreadStreamEvent) -> None:
        """Keep the items under way up to date, as the SDK does for a cancelled stream."""
        if isinstance(event, ThreadItemAddedEvent):
            pending[event.item.id] = event.item.model_copy(deep=True)
        elif isinstance(event, ThreadItemDoneEvent):
            pending.pop(event.item.id, None)
        elif isinstance(event, ThreadItemUpdatedEvent):
            # A part that is added or done is copied: the SDK's own tracking stores the same
            # part object, and each text delta would then be appended to it twice. (Deltas
            # themselves are strings: no copy per delta.)
            if hasattr(event.update, "content"):
                event = event.model_copy(deep=True)
            self._update_pending_items(pending, event)

    def _keep_cut_answer(
        self, thread: ThreadMetadata, unfinished: dict[str, ThreadItem], context: RequestContext
    ) -> list[ThreadStreamEvent]:
        """The events that store an answer cut by a model failure the way ChatKit stores a
        cancelled one: the text the visitor read, then a hidden note for the next turn."""
        kept: list[ThreadStreamEvent] = [
            ThreadItemDoneEvent(item=item)
            for item in unfinished.values()
            if isinstance(item, AssistantMessageItem)
            and any(part.text.strip() for part in item.content)
        ]
        if kept:
            note = SDKHiddenContextItem(
                thread_id=thread.id,
                created_at=datetime.now(),
                id=self.store.generate_item_id("sdk_hidden_context", thread, context),
                content=CUT_NOTE,
            )
            kept.append(ThreadItemDoneEvent(item=note))
        return kept

    async def _set_title(
        self,
        thread: ThreadMetadata,
        text: str,
        agent: Agent[Any],
        context: RequestContext,
        cost: TitleCost,
    ) -> None:
        """Give ``thread`` a title; the SDK saves it and sends ``thread.updated``."""
        model = self.title_model or agent.model  # None: the Agents SDK default, as the agent's
        config = self.model.run_config() if self.model is not None else RunConfig()
        title = await make_title(text, model, config, cost, context.request_id)
        try:  # the visitor may have named the thread while the answer streamed
            current = await self.store.load_thread(thread.id, context=context)
        except (StoreFailed, NotFoundError):
            return
        if current.title is None:
            thread.title = title[:MAX_TITLE_CHARS]

    def _agent_for(self, context: RequestContext) -> Agent[Any]:
        if self.site is None or isinstance(self.agent, Agent):
            return resolve_agent(self.agent, context)
        return self.site.agent(self.site.call(resolve_agent, self.agent, context))

    def _report_usage(
        self,
        context: RequestContext,
        usage: object,
        outcome: Literal["completed", "failed", "cancelled"],
        meter: ReplyMeter,
        title: TitleCost,
    ) -> None:
        if self.on_usage is None:
            return
        charge = meter.charge(outcome, usage)
        input_tokens = charge.input_tokens + title.input_tokens
        output_tokens = charge.output_tokens + title.output_tokens
        report = TokenUsage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
            requests=max(getattr(usage, "requests", 0), meter.finished_calls) + title.requests,
            outcome=outcome,
            charged_tokens=charge.total + title.total,
        )
        self._report(context, report)

    def _report(self, context: RequestContext, report: TokenUsage) -> None:
        if self.on_usage is None:
            return
        try:
            self.on_usage(context, report)
        except Exception:
            log.exception("on_usage callback failed [%s]", context.request_id)
