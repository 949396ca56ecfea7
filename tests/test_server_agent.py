"""Loading the site's agent, building a plain one, and the per-loop model client."""

from __future__ import annotations

import asyncio
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("agents")

from agents import Agent
from agents.models.openai_provider import OpenAIProvider

from chatkit_flask.server import agent as agent_module
from chatkit_flask.server.agent import (
    ModelClient,
    build_plain_agent,
    load_agent_spec,
    resolve_agent,
)
from chatkit_flask.server.bridge import AsyncBridge
from chatkit_flask.server.context import RequestContext
from chatkit_flask.settings import ConfigError

CONTEXT = RequestContext(owner="visitor:x")


@pytest.fixture
def site_module() -> Iterator[types.ModuleType]:
    module = types.ModuleType("site_agents_for_test")
    module.support = Agent(name="Support", model="m")  # type: ignore[attr-defined]
    module.per_user = lambda context: Agent(name=context.owner, model="m")  # type: ignore[attr-defined]
    module.wrong = lambda context: "not an agent"  # type: ignore[attr-defined]
    module.number = 42  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


def test_load_agent_spec_gives_an_agent_or_a_factory(site_module: types.ModuleType) -> None:
    assert load_agent_spec("site_agents_for_test:support") is site_module.support
    factory = load_agent_spec("site_agents_for_test:per_user")
    assert resolve_agent(factory, CONTEXT).name == "visitor:x"
    with pytest.raises(TypeError, match=r"not agents\.Agent"):
        resolve_agent(load_agent_spec("site_agents_for_test:wrong"), CONTEXT)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_colon", "expected 'package.module:name'"),
        ("missing_module_xyz:agent", "cannot import"),
        ("site_agents_for_test:absent", "has no attribute"),
        ("site_agents_for_test:number", "is a int"),
    ],
)
def test_bad_agent_specs_are_config_errors(
    site_module: types.ModuleType, spec: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)) as caught:
        load_agent_spec(spec)
    assert caught.value.key == "CHATKIT_AGENT"


def test_plain_agent_reads_instructions_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "prompt.md").write_text("Be kind.", encoding="utf-8")
    monkeypatch.setattr(agent_module, "CONFIG_DIR", tmp_path)

    assert build_plain_agent("gpt-x", "@prompt.md").instructions == "Be kind."
    assert build_plain_agent("gpt-x", f"@{tmp_path / 'prompt.md'}").instructions == "Be kind."
    literal = build_plain_agent("gpt-x", "Say hi.")
    assert (literal.name, literal.model, literal.instructions) == ("Assistant", "gpt-x", "Say hi.")
    with pytest.raises(ConfigError) as caught:
        build_plain_agent("gpt-x", "@missing.md")
    assert caught.value.key == "CHATKIT_AGENT_INSTRUCTIONS"


def test_model_client_is_made_once_per_loop_and_hides_the_key() -> None:
    model = ModelClient(api_key="secret-value", base_url="http://127.0.0.1:9/v1", max_retries=0)
    assert "secret-value" not in repr(model)
    bridge = AsyncBridge()
    try:
        async def provider() -> OpenAIProvider:
            config = model.run_config()
            assert config.tracing_disabled
            return config.model_provider  # type: ignore[return-value]

        first = bridge.run(provider, timeout=2)
        assert bridge.run(provider, timeout=2) is first
    finally:
        bridge.close()
    with pytest.raises(RuntimeError):  # outside a running loop
        model.run_config()
    assert asyncio.run(provider()) is not first  # another loop, another client
