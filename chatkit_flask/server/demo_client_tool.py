"""The demo's client tool: the agent asks the visitor's browser about the page it shows (title,
address, language, local time), a question only the browser can answer.

The tool hands the call to the browser (``ctx.context.client_tool_call``) and the run stops at
it (``StopAtTools``), as OpenAI's samples do: the stream ends with a pending
``client_tool_call`` item, the page answers with chatkit-js's ``onClientTool`` (``static/
demo.js``), chatkit-js sends ``threads.add_client_tool_output`` and the run continues. Only the
standalone service's demo uses it (``CHATKIT_DEMO`` on, server mode, no ``CHATKIT_AGENT``).
"""

from __future__ import annotations

from typing import Any

from agents import Agent, RunContextWrapper, StopAtTools, function_tool
from chatkit.agents import AgentContext, ClientToolCall

from .context import RequestContext

__all__ = ["CLIENT_TOOL", "get_page_info", "with_client_tool"]

CLIENT_TOOL = "get_page_info"


@function_tool(name_override=CLIENT_TOOL)
async def get_page_info(ctx: RunContextWrapper[AgentContext[RequestContext]]) -> str:
    """Ask the visitor's browser which page they are on (its title and path), the browser's
    language, and the visitor's local time and time zone: call it when the visitor asks about
    any of these, then answer from what the browser sends back."""
    ctx.context.client_tool_call = ClientToolCall(name=CLIENT_TOOL, arguments={})
    return "Asked the visitor's browser."  # not sent to the model: the run stops here


def with_client_tool(agent: Agent[Any]) -> Agent[Any]:
    """A copy of ``agent`` that also has :func:`get_page_info` and ends its run there (besides
    the tools it already stops at). Its instructions are left as they are: the tool's own
    description says when to call it."""
    behavior = agent.tool_use_behavior
    if behavior == "run_llm_again":
        behavior = StopAtTools(stop_at_tool_names=[CLIENT_TOOL])
    elif isinstance(behavior, dict):  # StopAtTools is a TypedDict
        behavior = StopAtTools(
            stop_at_tool_names=[*behavior.get("stop_at_tool_names", []), CLIENT_TOOL]
        )
    # "stop_on_first_tool" already ends there; a function of the agent's decides for itself.
    return agent.clone(tools=[*agent.tools, get_page_info], tool_use_behavior=behavior)
