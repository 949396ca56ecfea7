"""The site's agent (``CHATKIT_AGENT = "<package>.agent:assistant"``) and its tool, which reads
the signed-in user's row from the site's database.

The tool runs on the chat's event loop, inside a fresh app context of the site (pushed and
torn down around each call, so ``db.session`` gives its connection back). There is no request:
the signed-in user comes from the ChatKit request context, as the id the site's user loader
returned (a string).
"""

from __future__ import annotations

from agents import Agent, RunContextWrapper, function_tool
from chatkit.agents import AgentContext

from chatkit_flask.server.context import RequestContext

from .extensions import db
from .models import User


@function_tool
def my_account(ctx: RunContextWrapper[AgentContext[RequestContext]]) -> str:
    """The signed-in user's name and plan on this site."""
    user_id = ctx.context.request_context.user_id
    if user_id is None:
        return "The visitor is not signed in."
    user = db.session.get(User, int(user_id))
    if user is None:
        return "No such user."
    return f"{user.name} (user {user.id}) is on the {user.plan} plan."


assistant = Agent(
    name="Shop assistant",
    instructions="Answer questions about the shop. Use my_account for the user's own account.",
    model="gpt-4.1-mini",
    tools=[my_account],
)
