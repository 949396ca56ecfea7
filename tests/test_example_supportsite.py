"""OpenAI's customer-support sample, its meal-preference feature as docs/porting.md ports it
(tests/example_host/supportsite), through HTTP with the fake model calling its tool: the widget
is shown and stored, its action answers and is stored, the thread gets a model-made title with
its tokens counted, and the next turn tells the model what was picked. The guide's code
snippets are the example's own lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chatkit_flask.server")

from flask import Flask

from chatkit_flask.server.protocol import FAILED_MESSAGE
from chatkit_flask.testing import ChatKitDriver
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.example_host.supportsite import create_app
from tests.test_server_mode import close_app

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "tests" / "example_host" / "supportsite"
GUIDE = ROOT / "docs" / "porting.md"

pytestmark = pytest.mark.filterwarnings("ignore:Direct usage of named widget classes")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=TEST_API_KEY) as server:
        yield server


@pytest.fixture
def site(fake: FakeResponses, tmp_path: Path) -> Iterator[Flask]:
    fake.clear()
    app = create_app({
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": fake.base_url,
        "SECRET_KEY": TEST_SECRET_KEY,
        "CHATKIT_STORE_URL": f"sqlite:///{tmp_path}/threads.db",
        "CHATKIT_COOKIE_SECURE": False,
        "CHATKIT_TOKENS_PER_USER": "100000 per day",
        "RATELIMIT_STORAGE_URI": "memory://",
        "TESTING": True,
    })  # fmt: skip
    yield app
    close_app(app)


def test_the_tool_shows_the_picker_and_the_thread_gets_a_title(
    site: Flask, fake: FakeResponses
) -> None:
    charged: list[Any] = []
    site.extensions["chatkit"].server.usage_hooks.append(lambda _ctx, use: charged.append(use))
    chat = ChatKitDriver(site)
    fake.enqueue(Reply.call_tool("meal_preference_list"),
                 Reply(text="Meal preference help", input_tokens=700, output_tokens=3))
    reply = chat.send("Can I change my meal?")
    (picker,) = reply.widgets

    assert reply.text == "Please select your meal preference."
    options = picker["widget"]["children"]
    assert [o["key"] for o in options] == ["vegetarian", "kosher", "gluten intolerant", "child"]
    assert options[1]["onClickAction"]["payload"] == {"meal": "kosher"}
    # StopAtTools: one model call for the answer, then the title call (the agent's model).
    assert fake.count == 2
    assert fake.requests[1].json["model"] == "gpt-4.1-mini"
    assert reply.title == "Meal preference help"
    assert [t["title"] for t in chat.threads()] == ["Meal preference help"]
    # The title call is charged with the answer (the visitor's token budget is on).
    [usage] = charged
    assert usage.requests == 2 and usage.input_tokens > 700 and usage.output_tokens >= 3


def show_picker(chat: ChatKitDriver, fake: FakeResponses) -> dict[str, Any]:
    fake.enqueue(Reply.call_tool("meal_preference_list"), "Meal preference help")
    (picker,) = chat.send("Can I change my meal?").widgets
    return picker


def test_the_action_updates_the_stored_widget_and_tells_the_next_turn(
    site: Flask, fake: FakeResponses
) -> None:
    chat = ChatKitDriver(site)
    picker = show_picker(chat, fake)

    answer = chat.action("support.set_meal_preference", {"meal": "kosher"}, item_id=picker["id"])

    (picked,) = answer.widgets
    icons = {o["key"]: o["children"][0]["children"][0]["name"]
             for o in picked["widget"]["children"]}  # fmt: skip
    assert icons["kosher"] == "check" and icons["child"] == "empty-circle"
    assert all(o.get("onClickAction") is None for o in picked["widget"]["children"])
    assert answer.text == 'Your meal preference has been updated to "Kosher".'
    stored = {item["id"]: item for item in chat.items()}  # the hidden note is not sent
    assert stored[picker["id"]]["widget"] == picked["widget"]
    assert fake.count == 2  # the action itself asks no model

    fake.enqueue("Noted.")
    chat.send("thanks")
    sent = json.dumps(fake.requests[-1].json["input"])
    assert "support.set_meal_preference payload: kosher" in sent


def test_a_made_up_meal_is_a_generic_error(site: Flask, fake: FakeResponses) -> None:
    chat = ChatKitDriver(site)
    picker = show_picker(chat, fake)
    answer = chat.action("support.set_meal_preference", {"meal": "caviar"}, item_id=picker["id"])
    assert [e["message"] for e in answer.errors] == [FAILED_MESSAGE]
    assert not answer.widgets


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def test_the_guides_snippets_are_the_example_sites_code() -> None:
    """Each ```python block of docs/porting.md headed ``# supportsite/<file>`` (the example
    site) or ``# tests/<file>`` is found in that file, line for line (indentation aside)."""
    blocks = re.findall(r"```python\n# ((?:supportsite|tests)/\S+)[^\n]*\n(.*?)```",
                        GUIDE.read_text(), re.S)  # fmt: skip
    assert len(blocks) >= 5, blocks
    for name, body in blocks:
        path = SITE.parent / name if name.startswith("supportsite/") else ROOT / name
        want, have = _lines(body), _lines(path.read_text())
        starts = [i for i, line in enumerate(have) if line == want[0]]
        assert any(have[i : i + len(want)] == want for i in starts), (
            f"docs/porting.md quotes {name} wrongly: {want[:3]}"
        )
