"""The widget's action: the sample's ``_handle_meal_preference_action``, registered by name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageItem,
    HiddenContextItem,
    ThreadItemDoneEvent,
    ThreadItemReplacedEvent,
    ThreadStreamEvent,
)

from chatkit_flask.server.actions import ActionContext

from .extensions import chatkit
from .meal_preferences import (
    MEAL_LABELS,
    SET_MEAL_PREFERENCE_ACTION_TYPE,
    SetMealPreferencePayload,
    build_meal_preference_widget,
)


@chatkit.action(SET_MEAL_PREFERENCE_ACTION_TYPE)
async def set_meal_preference(ctx: ActionContext) -> AsyncIterator[ThreadStreamEvent]:
    meal = SetMealPreferencePayload.model_validate(ctx.payload).meal
    if ctx.sender is None:
        return
    # Replaced, not updated: the picked widget is stored, so a reload shows it.
    widget = build_meal_preference_widget(selected=meal)
    yield ThreadItemReplacedEvent(item=ctx.sender.model_copy(update={"widget": widget}))
    text = f'Your meal preference has been updated to "{MEAL_LABELS[meal]}".'
    yield ThreadItemDoneEvent(
        item=AssistantMessageItem(
            id=ctx.new_item_id("message"),
            thread_id=ctx.thread.id,
            created_at=datetime.now(),
            content=[AssistantMessageContent(text=text)],
        )
    )
    # For the model's next turn (stored, never sent to the browser).
    yield ThreadItemDoneEvent(
        item=HiddenContextItem(
            id=ctx.new_item_id("message"),
            thread_id=ctx.thread.id,
            created_at=datetime.now(),
            content=f"<WIDGET_ACTION>{ctx.action.type} payload: {meal}</WIDGET_ACTION>",
        )
    )
