"""Build what a worker builds and imports once, in gunicorn's master, before the workers fork.

The workers inherit the result and share its memory pages until they write to them
(``gc.freeze`` keeps the collector from doing so); without it each worker spent about a second
of CPU on its first visitor's reply, and held its own copy of all of it (docs/benchmark.md,
"Idle memory").

- **The SDKs' lazy models**: the openai client builds the Responses API's stream events on
  first use (``defer_build``), the ChatKit SDK its thread, item and event models. A thread
  created and a message added through the ChatKit SDK's server, against an in-memory store and
  an agent streaming a canned answer (an in-memory transport: no socket, no thread, no key),
  builds all of it.
- **The packages a worker imports** (:data:`SHARED_IMPORTS`) and **the app's own modules**
  (:data:`APP_IMPORTS`), imported, not run: no app is made here, no setting read, no store
  opened. With a SQL store (gunicorn's settings check tells which database) its modules and
  driver too (:data:`SQL_IMPORTS`). The metrics modules stay out (prometheus-client is first
  imported in a worker, after gunicorn's master has made its metrics directory). On SIGHUP
  :func:`reimport_app_modules` drops the app's modules and imports them again, so the workers
  it starts run the new code.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import logging
import sys
from types import ModuleType
from typing import Any

log = logging.getLogger("chatkit_flask")

__all__ = ["APP_IMPORTS", "SHARED_IMPORTS", "reimport_app_modules", "warm_sdks"]

# Packages a server-mode worker imports whatever the settings, besides those the app's modules
# import: uvicorn's parts (chosen when it starts serving), the limiter's storages, the async
# HTTP backend. One that is not installed is skipped.
SHARED_IMPORTS = (
    "flask_login",
    "limits.aio.storage",
    "limits.storage",
    "redis.asyncio",
    "anyio._backends._asyncio",
    "uvicorn.lifespan.off",
    "uvicorn.loops.uvloop",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.auto",
)
# The app's modules a server-mode worker imports, with what they import (not the metrics, and
# not the SQL store: SQLAlchemy only where a SQL store is configured).
APP_IMPORTS = (
    "chatkit_flask.service",
    "chatkit_flask.demo",
    "chatkit_flask.server.runtime",
    "chatkit_flask.server.views",
    "chatkit_flask.server.store_redis",
    "chatkit_flask.server.store_sqlite",
    "chatkit_flask.server.demo_site",
    "chatkit_flask.server.demo_client_tool",
    "chatkit_flask.server.workers",
)
# With a SQL store (the master learns the URL's database from the settings check, never the
# URL): SQLAlchemy's async layer, Alembic's revision reader (the start-up probe), the driver, and
# the store's own module, else each worker imports them on its own (docs/benchmark.md).
SQL_IMPORTS = ("sqlalchemy.ext.asyncio", "alembic.config", "alembic.script",
               "alembic.runtime.migration")  # fmt: skip
_MYSQL_DRIVER = ("pymysql", "aiomysql", "sqlalchemy.dialects.mysql.aiomysql")
SQL_DRIVER_IMPORTS = {
    "postgresql": ("psycopg", "sqlalchemy.dialects.postgresql.psycopg"),
    "mysql": _MYSQL_DRIVER,
    "mariadb": _MYSQL_DRIVER,  # MariaDB runs on the MySQL dialect and driver
    "sqlite": ("aiosqlite", "sqlalchemy.dialects.sqlite.aiosqlite"),
}
SQL_APP_IMPORTS = ("chatkit_flask.server.store_sql",)
_APP_PACKAGE = "chatkit_flask"
_app_imports: list[str] = list(APP_IMPORTS)  # what the warm-up imported of the app's
_app_modules: list[str] = []  # what importing them added to sys.modules


def _event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


def _canned_stream() -> bytes:
    """A short streamed answer, as the Responses API sends one."""
    message = {"id": "msg_warm", "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "ok", "annotations": [],
                            "logprobs": []}]}  # fmt: skip
    response = {
        "id": "resp_warm", "object": "response", "created_at": 0, "model": "warm-up",
        "instructions": "-", "output": [], "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": [], "error": None, "incomplete_details": None, "metadata": {},
        "temperature": 1.0, "top_p": 1.0, "status": "in_progress",
        "text": {"format": {"type": "text"}}, "truncation": "disabled",
    }  # fmt: skip
    usage = {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 2}  # fmt: skip
    done = {**response, "status": "completed", "output": [message], "usage": usage}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    return b"".join(
        [
            _event("response.created", sequence_number=0, response=response),
            _event(
                "response.output_item.added",
                sequence_number=1,
                output_index=0,
                item={**message, "status": "in_progress", "content": []},
            ),
            _event(
                "response.content_part.added",
                sequence_number=2,
                item_id="msg_warm",
                output_index=0,
                content_index=0,
                part=part,
            ),
            _event(
                "response.output_text.delta",
                sequence_number=3,
                item_id="msg_warm",
                output_index=0,
                content_index=0,
                delta="ok",
                logprobs=[],
            ),
            _event(
                "response.output_text.done",
                sequence_number=4,
                item_id="msg_warm",
                output_index=0,
                content_index=0,
                text="ok",
                logprobs=[],
            ),
            _event(
                "response.content_part.done",
                sequence_number=5,
                item_id="msg_warm",
                output_index=0,
                content_index=0,
                part={**part, "text": "ok"},
            ),
            _event("response.output_item.done", sequence_number=6, output_index=0, item=message),
            _event("response.completed", sequence_number=7, response=done),
        ]
    )


def _memory_store() -> Any:
    """The SDK's ``Store`` in dicts: what a round trip uses (one thread and its items)."""
    from chatkit.store import NotFoundError, Store
    from chatkit.types import Page

    class MemoryStore(Store[None]):
        def __init__(self) -> None:
            self.threads: dict[str, Any] = {}
            self.items: dict[str, Any] = {}

        async def load_thread(self, thread_id: str, context: None) -> Any:
            if thread_id not in self.threads:
                raise NotFoundError(thread_id)
            return self.threads[thread_id]

        async def save_thread(self, thread: Any, context: None) -> None:
            self.threads[thread.id] = thread

        async def load_thread_items(
            self, thread_id: str, after: str | None, limit: int, order: str, context: None
        ) -> Any:
            items = [item for item in self.items.values() if item.thread_id == thread_id]
            return Page(data=(items[::-1] if order == "desc" else items)[:limit], has_more=False)

        async def add_thread_item(self, thread_id: str, item: Any, context: None) -> None:
            self.items[item.id] = item

        async def save_item(self, thread_id: str, item: Any, context: None) -> None:
            self.items[item.id] = item

        async def load_item(self, thread_id: str, item_id: str, context: None) -> Any:
            return self.items[item_id]

        async def _unused(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        load_threads = delete_thread = delete_thread_item = _unused
        save_attachment = load_attachment = delete_attachment = _unused

    return MemoryStore()


async def _round_trip() -> None:
    """A thread created and a message added through the ChatKit SDK's server, each answered by
    an agent streaming the canned answer: what a worker's first two replies build (the request
    union, the thread, item and event models, the agent input conversion) is built here."""
    import httpx2
    from agents import Agent, OpenAIResponsesModel, RunConfig, Runner
    from chatkit.agents import AgentContext, ThreadItemConverter, stream_agent_response
    from chatkit.server import ChatKitServer
    from openai import AsyncOpenAI

    body = _canned_stream()

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    client = AsyncOpenAI(api_key="warm-up", base_url="http://warm-up.invalid/v1", http_client=http)
    agent = Agent(name="warm-up", instructions="-", model=OpenAIResponsesModel("warm-up", client))

    class Server(ChatKitServer):
        async def respond(self, thread: Any, input_user_message: Any, context: Any) -> Any:
            page = await self.store.load_thread_items(thread.id, None, 20, "asc", context)
            agent_input = await ThreadItemConverter().to_agent_input(page.data)
            agent_context = AgentContext(thread=thread, store=self.store, request_context=context)
            run_config = RunConfig(tracing_disabled=True)
            result = Runner.run_streamed(
                agent, agent_input, context=agent_context, run_config=run_config
            )
            async for event in stream_agent_response(agent_context, result):
                yield event
            thread.title = "-"  # as the app titles a new thread: a thread.updated event

    server = Server(_memory_store())
    message = {"content": [{"type": "input_text", "text": "-"}], "attachments": [],
               "inference_options": {}}  # fmt: skip

    async def send(kind: str, **params: Any) -> None:
        result = await server.process(json.dumps({"type": kind, "params": params}), None)
        async for _ in result:  # type: ignore[union-attr]
            pass

    try:
        await send("threads.create", input=message)
        (thread_id,) = server.store.threads
        await send("threads.add_user_message", input=message, thread_id=thread_id)
    finally:
        await client.close()


def _import_shared(sql_database: str | None) -> None:
    modules = SHARED_IMPORTS
    if sql_database is not None:
        modules += SQL_IMPORTS + SQL_DRIVER_IMPORTS.get(sql_database, ())
    for module in modules:
        with contextlib.suppress(ImportError):  # not installed: the worker imports what it has
            importlib.import_module(module)


def _is_app(module: str) -> bool:
    return module == _APP_PACKAGE or module.startswith(_APP_PACKAGE + ".")


def _import_app() -> None:
    before = set(sys.modules)
    try:
        for module in _app_imports:
            importlib.import_module(module)
    finally:
        _app_modules[:] = sorted(name for name in set(sys.modules) - before if _is_app(name))


def _forget_app_modules() -> None:
    """Drop the modules :func:`_import_app` added, and the names they left on the modules kept
    (a package's submodule, ``chatkit_flask``'s lazy exports): the next import runs them anew."""
    dropped = {name: sys.modules.pop(name, None) for name in _app_modules}
    _app_modules.clear()
    for name, module in list(sys.modules.items()):
        if module is None or not _is_app(name):
            continue
        for key, value in list(vars(module).items()):
            if (isinstance(value, ModuleType) and value.__name__ in dropped) or (
                not isinstance(value, ModuleType) and getattr(value, "__module__", None) in dropped
            ):
                delattr(module, key)


def _freeze() -> None:
    gc.collect()
    gc.freeze()  # what exists now stays out of the collector's passes: shared pages stay shared


def warm_sdks(sql_database: str | None = None) -> bool:
    """Build the SDKs' lazy models and import :data:`SHARED_IMPORTS` and :data:`APP_IMPORTS` in
    this process, and the SQL store's modules when ``sql_database`` (``postgresql``, ``mysql``,
    ``mariadb``, ``sqlite``) names the database of the service's SQL store; True when it worked.
    A failure is logged and changes nothing else (the workers build and import what they need,
    as before)."""
    _app_imports[:] = APP_IMPORTS + (SQL_APP_IMPORTS if sql_database is not None else ())
    try:
        for module in ("chatkit.server", "chatkit.agents"):  # their models, built at import
            importlib.import_module(module)

        asyncio.run(_round_trip())
        _import_shared(sql_database)
        _import_app()
    except Exception as exc:
        _forget_app_modules()
        log.warning("chatkit_flask: SDK warm-up skipped: %s: %s", type(exc).__name__, exc)
        return False
    _freeze()
    return True


def reimport_app_modules() -> bool:
    """After a SIGHUP: the app's modules imported again (its new code, if it changed), so that
    the workers started next run it; False (logged) when that import fails, the workers then
    import the app themselves."""
    if not _app_modules:
        return False
    _forget_app_modules()
    try:
        _import_app()
    except Exception as exc:
        _forget_app_modules()
        log.warning("chatkit_flask: app modules not reloaded: %s: %s", type(exc).__name__, exc)
        return False
    _freeze()
    return True
