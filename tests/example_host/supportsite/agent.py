"""The support agent and its widget tool (``CHATKIT_AGENT = "supportsite.agent:support_agent"``).
The sample's other tools port the same way; this one shows a widget."""

from __future__ import annotations

from datetime import datetime

from agents import Agent, RunContextWrapper, StopAtTools, function_tool
from chatkit.agents import AgentContext
from chatkit.types import AssistantMessageContent, AssistantMessageItem, ThreadItemDoneEvent

from chatkit_flask.server.context import RequestContext

from .meal_preferences import build_meal_preference_widget

INSTRUCTIONS = (
    "You are a friendly airline customer support agent. When the traveller asks about meals, "
    "call meal_preference_list to show the meal preference picker."
)


@function_tool(description_override="Display the meal preference picker.")
async def meal_preference_list(ctx: RunContextWrapper[AgentContext[RequestContext]]) -> str:
    await ctx.context.stream(
        ThreadItemDoneEvent(
            item=AssistantMessageItem(
                id=ctx.context.generate_id("message"),
                thread_id=ctx.context.thread.id,
                created_at=datetime.now(),
                content=[AssistantMessageContent(text="Please select your meal preference.")],
            )
        )
    )
    await ctx.context.stream_widget(build_meal_preference_widget())
    return "Shared meal preference options with the traveller."


support_agent = Agent[AgentContext[RequestContext]](
    name="Airline support",
    model="gpt-4.1-mini",
    instructions=INSTRUCTIONS,
    tools=[meal_preference_list],
    # As in the sample: the run ends once the widget is shown.
    tool_use_behavior=StopAtTools(stop_at_tool_names=[meal_preference_list.name]),
)
