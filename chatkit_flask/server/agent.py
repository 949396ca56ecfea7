"""Where the agent and its model client come from.

Either the site names its own Agents SDK agent (``CHATKIT_AGENT = "package.module:name"``: an
``Agent``, or a callable returning one per request), or the extension builds a plain one from a
model name and instructions. The model client is an ``AsyncOpenAI`` made on the bridge's loop
once per process (it is bound to the loop it first runs on) and handed to the Agents SDK through a
``RunConfig``, so nothing process-global is changed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agents import Agent, RunConfig
from agents.models.openai_provider import OpenAIProvider
from openai import AsyncOpenAI

from ..settings import ConfigError
from .bridge import LoopLocal
from .context import RequestContext

__all__ = [
    "AgentFactory",
    "AgentSource",
    "ModelClient",
    "build_plain_agent",
    "load_agent_spec",
    "resolve_agent",
]

# Where ``@file`` instructions are looked for, after the host app's instance folder: the
# service's config/ (a checkout or the image's /app/config; absent from an installed package), then
# the package itself, which ships the default instructions.md so that an installed site starts.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
PACKAGE_DIR = Path(__file__).resolve().parent

AgentFactory = Callable[[RequestContext], Agent]
AgentSource = Agent | AgentFactory


def load_agent_spec(spec: str) -> AgentSource:
    """Import ``"package.module:name"``: an ``Agent``, or a callable ``(RequestContext) -> Agent``.

    Raises ``ConfigError("CHATKIT_AGENT", ...)`` when the module or attribute is missing or the
    object is neither.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError("CHATKIT_AGENT", f"expected 'package.module:name', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("CHATKIT_AGENT", f"cannot import {module_name!r}: {exc}") from exc
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(
                "CHATKIT_AGENT", f"{module_name!r} has no attribute {attribute!r}"
            ) from None
    if isinstance(target, Agent):
        return target
    if callable(target) and not isinstance(target, type):
        return target  # type: ignore[return-value]  # checked per request by resolve_agent
    raise ConfigError(
        "CHATKIT_AGENT",
        f"{spec!r} is a {type(target).__name__}; expected an agents.Agent or a callable "
        "returning one",
    )


def resolve_agent(source: AgentSource, context: RequestContext) -> Agent:
    """The agent for one request (a factory's wrong return type is a ``TypeError``)."""
    if isinstance(source, Agent):
        return source
    agent = source(context)
    if not isinstance(agent, Agent):
        raise TypeError(f"agent factory returned {type(agent).__name__}, not agents.Agent")
    return agent


def instruction_dirs(instance_path: str | Path | None) -> list[Path]:
    """The folders a relative ``@file`` is looked up in, first match wins: the host app's
    instance folder (Flask's place for a site's own files), the service's config/, the package."""
    dirs = [Path(instance_path)] if instance_path else []
    return [*dirs, CONFIG_DIR, PACKAGE_DIR]


def read_instructions(instructions: str, search_dirs: list[Path] | None = None) -> str:
    """``@path`` reads a file (a relative one from the first of ``search_dirs`` that has it,
    default :func:`instruction_dirs` without an instance folder); anything else is literal.

    Raises ``ConfigError("CHATKIT_AGENT_INSTRUCTIONS", ...)`` naming every place it looked.
    """
    if not instructions.startswith("@"):
        return instructions
    path = Path(instructions[1:]).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [folder / path for folder in (search_dirs or instruction_dirs(None))]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return candidate.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    "CHATKIT_AGENT_INSTRUCTIONS",
                    f"cannot read instructions file {str(candidate)!r}: {exc}",
                ) from exc
    looked = ", ".join(str(candidate) for candidate in candidates)
    raise ConfigError(
        "CHATKIT_AGENT_INSTRUCTIONS",
        f"instructions file {str(path)!r} not found (looked in: {looked})",
    )


def build_plain_agent(
    model: str, instructions: str, search_dirs: list[Path] | None = None
) -> Agent:
    """``Agent(name="Assistant")`` with ``instructions`` (literal or ``@file``, looked up in
    ``search_dirs``) and ``model``."""
    if not model.strip():
        raise ConfigError("CHATKIT_AGENT_MODEL", "must name a model, e.g. 'gpt-4.1-mini'")
    text = read_instructions(instructions, search_dirs)
    return Agent(name="Assistant", instructions=text, model=model)


@dataclass
class ModelClient:
    """How the model is reached. :meth:`run_config` must be called on the bridge loop.

    ``max_retries`` stays small: a retry doubles the wait a visitor sees, and the UI offers its
    own retry. ``timeout`` bounds connect and each read (a silent gap), not the whole answer
    (``CHATKIT_REPLY_TIMEOUT`` does, in ``protocol``).
    """

    api_key: str = field(repr=False)  # never in a log line
    base_url: str | None = None
    timeout: float = 60.0
    max_retries: int = 0
    disable_tracing: bool = True
    _provider: LoopLocal[OpenAIProvider] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._provider = LoopLocal(self._make_provider)

    def _make_provider(self) -> OpenAIProvider:
        client = AsyncOpenAI(
            api_key=self.api_key,
            base_url=self.base_url or None,
            max_retries=self.max_retries,
            timeout=self.timeout,
        )
        return OpenAIProvider(openai_client=client, use_responses=True)

    async def aclose(self) -> None:
        """On the loop: close this loop's client and its connections (if one was made)."""
        provider = self._provider.peek()
        if provider is not None:
            await provider.aclose()
            client = provider._client  # ours: the provider closes only the clients it made
            if client is not None:
                await client.close()

    def openai_client(self) -> AsyncOpenAI:
        """This process's ``AsyncOpenAI`` (made on first call on this loop), for calls beside
        the Agents SDK's (dictation)."""
        client = self._provider.get()._client
        assert client is not None  # ours: _make_provider always hands one over
        return client

    def run_config(self) -> RunConfig:
        """A ``RunConfig`` using this process's client (made on first call on this loop)."""
        return RunConfig(model_provider=self._provider.get(), tracing_disabled=self.disable_tracing)
