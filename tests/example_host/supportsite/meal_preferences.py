"""The meal-preference widget, built from a ``.widget`` template as in the sample."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from chatkit.widgets import WidgetRoot, WidgetTemplate
from pydantic import BaseModel

MealPreferenceOption = Literal["vegetarian", "kosher", "gluten intolerant", "child"]
SET_MEAL_PREFERENCE_ACTION_TYPE = "support.set_meal_preference"
MEAL_LABELS: dict[str, str] = {
    "vegetarian": "Vegetarian",
    "kosher": "Kosher",
    "gluten intolerant": "Gluten intolerant",
    "child": "Child",
}


class SetMealPreferencePayload(BaseModel):
    meal: MealPreferenceOption


template = WidgetTemplate.from_file(str(Path(__file__).with_name("meal_preferences.widget")))


def build_meal_preference_widget(selected: str | None = None) -> WidgetRoot:
    options = [{"value": value, "label": label} for value, label in MEAL_LABELS.items()]
    return template.build(
        {"options": options, "selected": selected, "actionType": SET_MEAL_PREFERENCE_ACTION_TYPE}
    )
