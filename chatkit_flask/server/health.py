"""What ``flask chatkit check`` asks of server mode: can the thread store keep a thread, can
the attachment storage keep a file (when attachments are on), and does the model answer with
this key and model name.

Each check returns a :class:`Finding` the CLI prints; nothing here prints, and no finding holds
the API key, a store password or a provider's raw error body.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import openai
from agents import Agent
from chatkit.types import ThreadMetadata

from ..sanitize import mask_url, redact_credentials
from .context import RequestContext
from .store import NotFoundError, StoreUnusable

if TYPE_CHECKING:
    from .runtime import ServerRuntime

__all__ = ["CHECK_PROMPT", "Finding", "check_files", "check_model", "check_store", "model_name"]

Problem = Literal["misconfigured", "unreachable"]
CHECK_PROMPT = "Reply with the single word: ok"
CHECK_MAX_OUTPUT_TOKENS = 16  # the Responses API's minimum: the check costs a few tokens
STORE_CHECK_TIMEOUT = 20.0  # seconds: above the store's own timeouts
_UNREACHABLE_REASONS = frozenset({"unreachable", "timeout", "locked", "io_error", "unavailable"})


@dataclass(frozen=True)
class Finding:
    """One line of the report: ``problem`` is None when the check passed; a ``warning`` (such
    as a Redis store without persistence) fails nothing."""

    text: str
    problem: Problem | None = None
    warning: bool = False


def check_store(runtime: ServerRuntime) -> list[Finding]:
    """Write, read back and delete a probe thread of a probe owner, as a conversation would."""
    store = runtime.store
    try:
        runtime.check_store(write=True, timeout=STORE_CHECK_TIMEOUT)
    except StoreUnusable as exc:
        problem: Problem = "unreachable" if exc.reason in _UNREACHABLE_REASONS else "misconfigured"
        return [Finding(f"the {store} cannot be used: {exc.cause} (CHATKIT_STORE_URL)", problem)]
    context = RequestContext(owner=f"check:{time.time_ns():x}", request_id="chatkit-check")
    thread = ThreadMetadata(id=store.generate_thread_id(context), created_at=datetime.now())

    async def round_trip() -> bool:
        await store.save_thread(thread, context)
        read = await store.load_thread(thread.id, context)
        await store.delete_thread(thread.id, context)
        try:
            await store.load_thread(thread.id, context)
        except NotFoundError:
            return read.id == thread.id
        return False

    started = time.perf_counter()
    try:
        kept = runtime.bridge.run(round_trip, STORE_CHECK_TIMEOUT)
    except Exception as exc:  # the class only: a driver's message can quote a URL
        return [Finding(f"the {store} failed a round trip: {type(exc).__name__}", "unreachable")]
    if not kept:
        return [Finding(f"the {store} did not give back or delete a thread", "misconfigured")]
    elapsed = (time.perf_counter() - started) * 1000
    where = mask_url(runtime.store_url)
    findings = [
        Finding(f"the {store} wrote, read back and deleted a probe thread in {elapsed:.0f} ms"),
        Finding(f"threads live at {where} (CHATKIT_STORE_URL)"),
    ]
    revisions = getattr(store, "schema_revisions", None)  # the SQL store (the probe checked it)
    if revisions is not None:
        current, _head = revisions()
        prefix = store.tables.prefix
        findings.append(Finding(f"its tables {prefix}* are at revision {current}, as this "
                                "version needs (flask chatkit db current)"))  # fmt: skip
    return findings


def model_name(runtime: ServerRuntime) -> str:
    """The model the agent uses: the site agent's own when it names one, else
    ``CHATKIT_AGENT_MODEL`` (a per-request agent factory cannot be asked without a request)."""
    agent = runtime.server.agent
    if isinstance(agent, Agent) and isinstance(agent.model, str) and agent.model:
        return agent.model
    return runtime.settings.agent_model


def check_files(runtime: ServerRuntime) -> list[Finding]:
    """Write, read back and delete a probe file in the attachment storage."""
    files = runtime.files
    if files is None:
        return []
    key, probe = f"atc_{secrets.token_hex(16)}", secrets.token_bytes(64)
    started = time.perf_counter()
    try:
        files.write(key, [probe])
        kept = files.read_all(key) == probe
        files.delete(key)
    except Exception as exc:  # the class only: a message can quote a bucket or a path
        return [Finding(f"the {files} failed a round trip: {type(exc).__name__} "
                        "(CHATKIT_FILES_URL)", "unreachable")]  # fmt: skip
    if not kept:
        return [Finding(f"the {files} did not give back the probe file", "misconfigured")]
    elapsed = (time.perf_counter() - started) * 1000
    return [Finding(f"the {files} wrote, read back and deleted a probe file in {elapsed:.0f} ms")]


def check_model(runtime: ServerRuntime) -> list[Finding]:
    """One small, non-streamed Responses call with the configured model and key."""
    settings = runtime.settings
    model = model_name(runtime)
    client = openai.OpenAI(
        api_key=settings.api_key,
        base_url=settings.openai_base_url or None,
        timeout=settings.model_timeout,
        max_retries=0,
    )
    started = time.perf_counter()
    try:
        response = client.responses.create(
            model=model,
            input=CHECK_PROMPT,
            max_output_tokens=CHECK_MAX_OUTPUT_TOKENS,
            store=False,
        )
    except openai.APIError as exc:
        return [_model_failure(exc, model, runtime)]
    finally:
        client.close()
    elapsed = (time.perf_counter() - started) * 1000
    return [Finding(f"model {response.model or model} answered in {elapsed:.0f} ms")]


def _model_failure(exc: openai.APIError, model: str, runtime: ServerRuntime) -> Finding:
    settings = runtime.settings
    base = settings.openai_base_url or "https://api.openai.com/v1"
    if isinstance(exc, openai.APITimeoutError):
        return Finding(
            f"the model did not answer within CHATKIT_MODEL_TIMEOUT={settings.model_timeout:g}s",
            "unreachable",
        )
    if isinstance(exc, openai.APIConnectionError):
        host = urlsplit(base).netloc or base
        return Finding(f"cannot reach the model at {host} (OPENAI_BASE_URL)", "unreachable")
    status = getattr(exc, "status_code", None)
    if status == 401:
        return Finding("key refused: the provider answered 401 (OPENAI_API_KEY)", "misconfigured")
    if status == 403:
        return Finding(
            f"permission denied (403): the key may not use model {model} (OPENAI_API_KEY)",
            "misconfigured",
        )
    if status == 404:
        return Finding(
            f"model not found: {model} (CHATKIT_AGENT_MODEL or the agent's model; the provider "
            f"at {base} answered 404)",
            "misconfigured",
        )
    if status == 429:
        return Finding("the provider rate limited the check (429); try again later", "unreachable")
    detail = redact_credentials(str(getattr(exc, "message", "")), settings.api_key)[:200]
    if status is not None and 400 <= status < 500:
        return Finding(f"the provider refused the request ({status}): {detail}", "misconfigured")
    return Finding(f"the provider failed ({status or type(exc).__name__}): {detail}", "unreachable")
