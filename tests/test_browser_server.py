"""Server mode in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright,
the service in server mode on a real socket (werkzeug's threaded server), the fake model on
loopback, limits in the real Redis and threads in a SQLite file.

The page is the demo page; the tests drive the served helper's functions on it:
``ChatKitFlask.configure()`` (what a site calls to configure chatkit-js) and
``ChatKitFlask.send()`` (one ChatKit request through the fetch that configure() gives the
widget, reading the event stream as it arrives). OpenAI's CDN is blocked: the widget itself
never loads here.

Screenshot: ``test-artifacts/demo-server.png``; ``CHATKIT_UPDATE_SCREENSHOT=1`` also refreshes
``docs/demo-server.png``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import REDIS_URL, TEST_SECRET_KEY, base_config

from chatkit_flask.service import create_app
from chatkit_flask.testing.fake_chatkit import FakeChatKit
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.browser_support import (
    CDN_PATTERN,
    CHROMIUM,
    CHROMIUM_ARGS,
    browser_contexts,
    launch_browser,
    wsgi_servers,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
COOKIE = "chatkit_session_id"
MODEL_KEY = "test-model-key-not-a-real-one"
TOKEN_DELAY = 0.12  # seconds between the fake model's words
WAIT = re.compile(r"Try again in (\d+) seconds?\.")

# One ChatKit request from the page: configure() then send(); events with their arrival times,
# refusals the helper reported (onError) and a thrown error, as plain objects.
SEND = """async ({ type, params, configure }) => {
  const reported = [];
  const api = await ChatKitFlask.configure({ ...(configure || {}),
                                             onError: (e) => reported.push({ message: e.message,
                                               status: e.status, code: e.code,
                                               retryAfter: e.retryAfter }) });
  const started = performance.now();
  const events = [];
  try {
    const answer = await ChatKitFlask.send(api, type, params, {
      onEvent: (event) => events.push({ at: performance.now() - started, event }) });
    return { ok: true, api: { url: api.url, domainKey: api.domainKey, fetch: typeof api.fetch },
             answer: Array.isArray(answer) ? null : answer, events, reported };
  } catch (e) {
    return { ok: false, name: e.name, message: e.message, status: e.status, code: e.code,
             retryAfter: e.retryAfter, requestId: e.requestId, events, reported };
  }
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


@pytest.fixture
def new_context(browser: Any) -> Iterator[Callable[[], Any]]:
    yield from browser_contexts(browser, viewport={"width": 820, "height": 900})


@pytest.fixture(scope="module")
def model() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=MODEL_KEY, token_delay=TOKEN_DELAY) as fake:
        yield fake


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    yield from wsgi_servers()


@pytest.fixture
def start_server_mode(
    model: FakeResponses, real_redis: Any, serve: Callable[[Any], str], tmp_path: Path
) -> Callable[..., str]:
    """Start the service in server mode (demo page on) -> base URL."""
    model.clear()

    def start(**overrides: Any) -> str:
        config = {
            "CHATKIT_BACKEND": "server",
            "OPENAI_API_KEY": MODEL_KEY,
            "OPENAI_BASE_URL": model.base_url,
            "SECRET_KEY": TEST_SECRET_KEY,
            "CHATKIT_AGENT_INSTRUCTIONS": "Echo the visitor.",
            "CHATKIT_STORE_URL": f"sqlite:///{tmp_path}/threads.db",
            "CHATKIT_COOKIE_SECURE": False,
            "CHATKIT_DEMO": True,
            "CHATKIT_TITLE_MODEL": "off",  # one model call per message, as the counts expect
            "RATELIMIT_STORAGE_URI": REDIS_URL,
            "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": False,
            **overrides,
        }
        return serve(create_app(config, environ={}))

    return start


def _open(ctx: Any, base: str) -> Any:
    page = ctx.new_page()
    page.goto(f"{base}/", wait_until="domcontentloaded")
    page.wait_for_function("() => !!window.ChatKitFlask && !!window.chatkitDemo")
    return page


def _send(page: Any, type_: str, params: dict[str, Any], **configure: Any) -> dict[str, Any]:
    return page.evaluate(SEND, {"type": type_, "params": params, "configure": configure})


def _input(text: str) -> dict[str, Any]:
    return {
        "input": {
            "content": [{"type": "input_text", "text": text}],
            "attachments": [],
            "inference_options": {},
        }
    }


def _deltas(result: dict[str, Any]) -> list[tuple[float, str]]:
    return [
        (e["at"], e["event"]["update"]["delta"])
        for e in result["events"]
        if e["event"]["type"] == "thread.item.updated"
        and e["event"]["update"].get("type") == "assistant_message.content_part.text_delta"
    ]


def _thread_id(result: dict[str, Any]) -> str:
    created = [e["event"] for e in result["events"] if e["event"]["type"] == "thread.created"]
    assert created, result
    return created[0]["thread"]["id"]


def _errors(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["event"] for e in result["events"] if e["event"]["type"] == "error"]


def test_the_reply_streams_into_the_page_word_by_word(
    new_context: Callable[[], Any], start_server_mode: Callable[..., str], model: FakeResponses
) -> None:
    base = start_server_mode()
    page = _open(new_context(), base)
    text = "one two three four five six seven eight nine ten"

    result = _send(page, "threads.create", _input(text))

    assert result["ok"], result
    # configure() found server mode by itself and gave chatkit-js what it needs.
    assert result["api"] == {"url": "/api/chatkit", "domainKey": "domain_pk_localhost_dev",
                             "fetch": "function"}  # fmt: skip
    deltas = _deltas(result)
    assert "".join(d for _, d in deltas) == f"You said: {text}"
    assert len(deltas) == 12  # one per word
    first, last = deltas[0][0], deltas[-1][0]
    # 11 gaps of 0.12 s: the deltas arrive spread over the model's pace, not in one piece.
    assert last - first >= 11 * TOKEN_DELAY * 0.7, deltas
    assert first < last / 2, deltas
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(deltas)]
    assert sum(1 for gap in gaps if gap >= TOKEN_DELAY * 0.5) >= 6, gaps
    assert result["reported"] == []
    assert model.count == 1


def test_the_demo_page_says_the_widget_is_missing_and_chats_without_it(
    new_context: Callable[[], Any], start_server_mode: Callable[..., str]
) -> None:
    base = start_server_mode()
    page = _open(new_context(), base)

    notice = page.locator("#chat-unavailable")
    notice.wait_for(state="visible")
    assert "could not be loaded from OpenAI's CDN" in notice.inner_text()
    status = page.locator('#status[data-kind="warning"]')
    status.wait_for()
    assert "could not load from OpenAI's CDN" in status.inner_text()

    page.fill("#try-input", "hello from the page")
    page.click("#try-send")
    reply = page.locator('#transcript li[data-who="assistant"]')
    page.wait_for_function(
        "() => document.querySelector('#transcript li[data-who=assistant]')"
        "?.textContent === 'You said: hello from the page'"
    )
    page.fill("#try-input", "and again")
    page.click("#try-send")
    page.wait_for_function(
        "() => document.querySelectorAll('#transcript li[data-who=assistant]').length === 2"
        " && document.querySelectorAll('#transcript li[data-who=assistant]')[1].textContent"
        " === 'You said: and again'"
    )
    assert reply.count() == 2
    assert "Reply streamed from /api/chatkit" in page.inner_text("#status")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo-server.png"
    page.set_viewport_size({"width": 820, "height": 560})
    page.screenshot(path=str(shot), full_page=True)
    docs = ARTIFACTS.parent / "docs" / "demo-server.png"
    if os.environ.get("CHATKIT_UPDATE_SCREENSHOT") or not docs.exists():
        shutil.copyfile(shot, docs)


def test_a_widget_button_reaches_the_sites_action_and_the_page_shows_its_answer(
    new_context: Callable[[], Any], start_server_mode: Callable[..., str], model: FakeResponses
) -> None:
    """The demo agent's card (the model calls offer_choices): the page draws it, a click sends
    threads.custom_action, and the @chatkit.action handler's answer shows in place."""
    base = start_server_mode()
    card = {"question": "Which fruit?", "choices": ["Apple", "Banana", "Cherry"]}
    model.enqueue(Reply.call_tool("offer_choices", card), "Pick one above.")
    page = _open(new_context(), base)

    page.fill("#try-input", "let me choose a fruit")
    page.click("#try-send")
    widget = page.locator('#transcript li[data-who="widget"]')
    widget.get_by_role("button", name="Banana").wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#transcript li[data-who=assistant]')]"
        ".some((li) => li.textContent === 'Pick one above.')"
    )
    assert widget.locator("strong").inner_text() == "Which fruit?"
    assert widget.get_by_role("button").all_inner_texts() == ["Apple", "Banana", "Cherry"]

    widget.get_by_role("button", name="Banana").click()

    page.wait_for_function(
        "() => [...document.querySelectorAll('#transcript li[data-who=assistant]')]"
        ".some((li) => li.textContent === 'You picked Banana.')"
    )
    assert widget.count() == 1  # the same card, redrawn from thread.item.replaced
    assert "You picked Banana" in widget.inner_text()
    assert widget.get_by_role("button").count() == 0
    assert "Action demo.choose answered by /api/chatkit" in page.inner_text("#status")
    assert model.count == 2  # the tool call and the text after it; the click asked no model
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-server-card.png"), full_page=True)


def test_the_visitor_keeps_their_threads_across_reloads(
    new_context: Callable[[], Any], start_server_mode: Callable[..., str]
) -> None:
    base = start_server_mode()
    ctx = new_context()
    page = _open(ctx, base)
    created = _send(page, "threads.create", _input("remember me"))
    thread_id = _thread_id(created)

    page.reload(wait_until="domcontentloaded")
    page.wait_for_function("() => !!window.ChatKitFlask")
    listed = _send(page, "threads.list", {"limit": 10, "order": "desc"})
    items = _send(page, "items.list", {"thread_id": thread_id, "limit": 10, "order": "asc"})

    assert listed["ok"] and items["ok"], (listed, items)
    assert [t["id"] for t in listed["answer"]["data"]] == [thread_id]
    kinds = [(item["type"], item["content"][0]["text"]) for item in items["answer"]["data"]]
    assert kinds == [
        ("user_message", "remember me"),
        ("assistant_message", "You said: remember me"),
    ]
    cookies = {c["name"]: c for c in ctx.cookies(base)}
    assert cookies[COOKIE]["httpOnly"] is True
    assert COOKIE not in page.evaluate("document.cookie")


def test_the_third_message_reads_the_limit_and_the_wait(
    new_context: Callable[[], Any], start_server_mode: Callable[..., str], model: FakeResponses
) -> None:
    base = start_server_mode(CHATKIT_RATELIMIT_PER_USER="2 per minute")
    page = _open(new_context(), base)
    first = _send(page, "threads.create", _input("one"))
    thread_id = _thread_id(first)
    second = _send(page, "threads.add_user_message", {**_input("two"), "thread_id": thread_id})
    assert not _errors(first) and not _errors(second)

    third = _send(page, "threads.add_user_message", {**_input("three"), "thread_id": thread_id})

    assert third["ok"], third
    [error] = _errors(third)
    assert error["code"] == "custom"
    assert error["message"].startswith("You have sent too many messages. Try again in ")
    wait = int(WAIT.search(error["message"]).group(1))
    assert 0 < wait <= 61
    # The page heard it too, with the wait as a number.
    [reported] = third["reported"]
    assert reported["message"] == error["message"]
    assert reported["retryAfter"] == wait
    assert model.count == 2

    # The demo page's own form shows the same text.
    page.fill("#try-input", "four")
    page.click("#try-send")
    shown = page.locator('#transcript li[data-who="error"]')
    shown.wait_for()
    assert WAIT.search(shown.inner_text())
    assert model.count == 2


def test_json_refusals_become_readable_text(
    new_context: Callable[[], Any], start_server_mode: Callable[..., str]
) -> None:
    """A 429 JSON (reads over the per-IP request limit) and a 503 JSON (limiter storage down):
    a read throws the server's words, a message gets them as an in-stream error event."""
    base = start_server_mode(CHATKIT_RATELIMIT_REQUESTS_PER_IP="2 per minute")
    page = _open(new_context(), base)
    for _ in range(2):
        assert _send(page, "threads.list", {"limit": 5})["ok"]

    read = _send(page, "threads.list", {"limit": 5})

    assert not read["ok"]
    assert read["name"] == "ChatKitSecretError"
    assert (read["status"], read["code"]) == (429, "rate_limited")
    assert read["message"].startswith("Too many requests came from your network. Try again in ")
    assert read["retryAfter"] == int(WAIT.search(read["message"]).group(1))
    assert read["requestId"]

    dead = start_server_mode(RATELIMIT_STORAGE_URI="redis://127.0.0.1:1/7")
    page = _open(new_context(), dead)
    message = _send(page, "threads.create", _input("hello"))
    listing = _send(page, "threads.list", {"limit": 5})

    assert message["ok"], message
    [error] = _errors(message)
    assert error == {
        "type": "error",
        "code": "custom",
        "message": "The chat is temporarily unavailable. Try again shortly.",
        "allow_retry": True,
    }
    assert message["reported"][0]["status"] == 503
    assert not listing["ok"]
    assert (listing["status"], listing["code"]) == (503, "limiter_unavailable")
    assert listing["retryAfter"] == 5


def test_another_visitor_cannot_reach_a_thread(
    new_context: Callable[[], Any], start_server_mode: Callable[..., str], model: FakeResponses
) -> None:
    base = start_server_mode()
    owner = _open(new_context(), base)
    thread_id = _thread_id(_send(owner, "threads.create", _input("mine")))
    stranger = _open(new_context(), base)

    read = _send(stranger, "items.list", {"thread_id": thread_id, "limit": 10})
    write = _send(
        stranger, "threads.add_user_message", {**_input("yours?"), "thread_id": thread_id}
    )
    listed = _send(stranger, "threads.list", {"limit": 10})

    assert (read["ok"], read["status"], read["code"]) == (False, 404, "not_found")
    assert read["message"] == "No such conversation."
    assert write["ok"], write
    not_found = {"code": "custom", "message": "No such conversation.", "allow_retry": False}
    assert _errors(write) == [{"type": "error", **not_found}]
    assert listed["answer"]["data"] == []
    assert model.count == 1
    # The owner still has it.
    assert [t["id"] for t in _send(owner, "threads.list", {"limit": 10})["answer"]["data"]] == [
        thread_id
    ]


# A stand-in for chatkit-js's <openai-chatkit> (its CDN bundle cannot load here): it keeps the
# options the page gives it, so a test can do what the widget does with them.
CHATKIT_ELEMENT_STUB = """customElements.define("openai-chatkit", class extends HTMLElement {
  setOptions(options) { window.chatkitOptions = options; }
});"""

# What chatkit-js does with a reply that ends on a client tool call: call the page's
# onClientTool({name, params}) and send its answer as threads.add_client_tool_output.
CLIENT_TOOL_ROUND = """async (text) => {
  const { api, onClientTool } = window.chatkitOptions;
  const input = { content: [{ type: "input_text", text }], attachments: [], inference_options: {} };
  const asked = await ChatKitFlask.send(api, "threads.create", { input });
  const call = asked[asked.length - 1].item;
  const result = await onClientTool({ name: call.name, params: call.arguments });
  const answered = await ChatKitFlask.send(api, "threads.add_client_tool_output",
                                           { thread_id: asked[0].thread.id, result });
  const again = await ChatKitFlask.send(api, "threads.add_client_tool_output",
                                        { thread_id: asked[0].thread.id, result });
  return { call, result, answered, again };
}"""


def test_the_demo_agents_client_tool_is_answered_by_the_page(
    new_context: Callable[[], Any], start_server_mode: Callable[..., str], model: FakeResponses
) -> None:
    """The model calls get_page_info: the reply ends on the call, the page's onClientTool
    answers from the browser and lists it, and the answer continues the run."""
    base = start_server_mode()
    ctx = new_context()
    ctx.add_init_script(CHATKIT_ELEMENT_STUB)
    page = _open(ctx, base)
    page.wait_for_function("() => !!window.chatkitOptions")
    model.enqueue(Reply.call_tool("get_page_info"), "You are on the chatkit-flask demo page.")

    round_trip = page.evaluate(CLIENT_TOOL_ROUND, "which page am I on?")

    call = round_trip["call"]
    assert (call["type"], call["name"], call["status"]) == ("client_tool_call", "get_page_info",
                                                           "pending")  # fmt: skip
    result = round_trip["result"]
    assert result["title"] == "chatkit-flask demo" and result["path"] == "/"
    assert result["language"] and result["localTime"]
    events = round_trip["answered"]
    assert events[-1]["item"]["content"][0]["text"] == "You are on the chatkit-flask demo page."
    # The model got the browser's answer as the tool's output.
    request = model.requests[-1].json
    outputs = [i["output"] for i in request["input"] if i.get("type") == "function_call_output"]
    assert [json.loads(output)["title"] for output in outputs] == ["chatkit-flask demo"]
    # A second answer to the same call is refused inside the stream, in words.
    (refused,) = round_trip["again"]
    assert refused["type"] == "error" and "not waiting" in refused["message"]
    assert model.count == 2

    listed = page.locator('#client-tool-calls li[data-who="client-tool"]')
    assert listed.count() == 1
    assert listed.inner_text().startswith('get_page_info({}) \u2192 {"title":"chatkit-flask demo"')
    # The helper reported the refusal (configure's onError): the page says it in words.
    assert "not waiting for a client tool's output" in page.inner_text("#status")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-server-client-tool.png"), full_page=True)


def test_the_server_fetch_contract_with_a_stub(
    new_context: Callable[[], Any], start_server_mode: Callable[..., str]
) -> None:
    """What createServerFetch() sends and how it answers, with scripted answers."""
    base = start_server_mode(CHATKIT_DOMAIN_KEY="domain_pk_test_123")
    page = _open(new_context(), base)
    result = page.evaluate(
        """async () => {
          const out = {};
          const api = await ChatKitFlask.configure();
          out.api = { url: api.url, domainKey: api.domainKey };
          out.override = (await ChatKitFlask.configure({ domainKey: "domain_pk_page" })).domainKey;
          const calls = [];
          const answers = [];
          const f = ChatKitFlask.createServerFetch({
            headers: { "X-Site": "demo" },
            fetch: async (url, init) => {
              calls.push({ url, credentials: init.credentials, site: init.headers.get("X-Site"),
                           type: init.headers.get("Content-Type") });
              const next = answers.shift();
              if (next instanceof Error) throw next;
              return next;
            },
          });
          const body = (type) => ({ method: "POST", body: JSON.stringify({ type, params: {} }),
                                    headers: { "Content-Type": "application/json" } });
          answers.push(new Response("{}", { headers: { "Content-Type": "application/json" } }));
          await f("/api/chatkit", body("threads.list"));
          out.calls = calls.slice();
          answers.push(new TypeError("Failed to fetch"));
          const offline = await f("/api/chatkit", body("threads.create"));
          out.offline = { status: offline.status, type: offline.headers.get("Content-Type"),
                          text: await offline.text() };
          answers.push(new TypeError("Failed to fetch"));
          try { await f("/api/chatkit", body("threads.list")); } catch (e) {
            out.offlineRead = { name: e.name, code: e.code, message: e.message }; }
          const abort = new DOMException("stopped", "AbortError");
          answers.push(abort);
          try { await f("/api/chatkit", body("threads.create")); } catch (e) {
            out.aborted = e === abort; }
          answers.push(new Response("<html>bad gateway</html>", { status: 502 }));
          const proxy = await f("/api/chatkit", body("threads.add_user_message"));
          out.proxy = await proxy.text();
          answers.push(new Response(JSON.stringify({ error: "rate_limited", retry_after: 9 }),
            { status: 429, headers: { "Content-Type": "application/json" } }));
          const viaRequest = await f(new Request("/api/chatkit", { method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ type: "threads.create", params: {} }) }));
          out.viaRequest = await viaRequest.text();
          out.lastCall = calls[calls.length - 1];
          return out;
        }"""
    )
    assert result["api"] == {"url": "/api/chatkit", "domainKey": "domain_pk_test_123"}
    assert result["override"] == "domain_pk_page"
    assert result["calls"] == [
        {"url": "/api/chatkit", "credentials": "same-origin", "site": "demo",
         "type": "application/json"}
    ]  # fmt: skip
    assert result["offline"]["status"] == 200
    assert result["offline"]["type"] == "text/event-stream"
    assert '"code":"custom"' in result["offline"]["text"]
    assert "Could not reach the chat server." in result["offline"]["text"]
    assert result["offlineRead"]["code"] == "network_error"
    assert result["aborted"] is True  # the widget's own cancel is passed through
    assert "The chat is unavailable. Try again later." in result["proxy"]
    # fetch(Request): its body still tells a message from a read; no message: ours, with the wait.
    assert "Too many messages. Try again in 9 seconds." in result["viaRequest"]
    assert result["lastCall"]["credentials"] == "same-origin"
    assert result["lastCall"]["site"] == "demo"


def test_configure_in_hosted_mode_gives_a_secret_fetcher(
    new_context: Callable[[], Any], upstream: FakeChatKit, real_redis: Any,
    serve: Callable[[Any], str],
) -> None:  # fmt: skip
    base = serve(
        create_app(
            base_config(
                upstream, CHATKIT_DEMO=True, RATELIMIT_STORAGE_URI=REDIS_URL, TESTING=False
            ),
            environ={},
        )
    )
    page = _open(new_context(), base)
    result = page.evaluate(
        """async () => {
          const api = await ChatKitFlask.configure();
          return { keys: Object.keys(api), secret: await api.getClientSecret(null) };
        }"""
    )
    assert result["keys"] == ["getClientSecret"]
    assert result["secret"].startswith("ek_")
    assert upstream.count == 1


def test_the_demo_command_serves_server_mode(tmp_path: Path) -> None:
    """``python -m chatkit_flask.demo --backend server``: a chat with the fake model, no key."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "OPENAI_"))}
    env.pop("RATELIMIT_STORAGE_URI", None)
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "chatkit_flask.demo", "--backend", "server",
             "--port", str(port), "--token-delay", "0.01"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        with requests.Session() as session:
            deadline = time.monotonic() + 40
            while True:
                try:
                    config = session.get(f"{base}/api/chatkit/config", timeout=2)
                    break
                except requests.ConnectionError:
                    assert demo.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
            assert config.json()["backend"] == "server"
            url = f"{base}{config.json()['url']}"
            card = session.post(
                url, json={"type": "threads.create", "params": _input("hi")}, timeout=30
            )
            assert card.headers["Content-Type"].startswith("text/event-stream")
            # The first answer shows the demo agent's card, its buttons wired to demo.choose.
            assert '"type":"widget"' in card.text and '"demo.choose"' in card.text, card.text
            thread_id = re.search(r'"id":"(thr_[0-9a-f]+)"', card.text).group(1)
            reply = session.post(
                url,
                json={"type": "threads.add_user_message",
                      "params": {**_input("hi demo"), "thread_id": thread_id}},
                timeout=30,
            )  # fmt: skip
            assert '"delta":" demo"' in reply.text, reply.text
            assert session.get(f"{base}/", timeout=5).status_code == 200
    finally:
        demo.terminate()
        demo.wait(10)
    assert "server mode" in log.read_text()


def test_a_page_on_another_origin_of_the_same_site_keeps_its_visitor(
    browser: Any,
    start_server_mode: Callable[..., str],
    serve: Callable[[Any], str],
    model: FakeResponses,
) -> None:
    """``www.example.test`` embeds the chat served by ``chat.example.test`` (both resolved to
    127.0.0.1 by Chromium): CORS with credentials, and the SameSite=Lax cookie still flows."""
    holder: dict[str, Any] = {}
    page_base = serve(lambda environ, start_response: holder["page"](environ, start_response))
    page_origin = page_base.replace("127.0.0.1", "www.example.test")
    service = start_server_mode(CHATKIT_ALLOWED_ORIGINS=page_origin).replace(
        "127.0.0.1", "chat.example.test"
    )
    html = (
        "<!doctype html><title>shop</title>"
        f'<script src="{service}/api/chatkit/static/chatkit-secret.js"></script>'
    ).encode()

    def page_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html")])
        return [html]

    holder["page"] = page_app
    # A second Chromium from the same Playwright, with both names mapped to loopback.
    args = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP *.example.test 127.0.0.1"]
    mapped = browser.browser_type.launch(executable_path=CHROMIUM, args=args, headless=True)
    try:
        ctx = mapped.new_context()
        ctx.set_default_timeout(15_000)
        ctx.route(CDN_PATTERN, lambda route: route.abort())
        page = ctx.new_page()
        page.goto(f"{page_origin}/")
        page.wait_for_function("() => !!window.ChatKitFlask")
        created = _send(page, "threads.create", _input("from the shop"), credentials="include")
        page.reload()
        page.wait_for_function("() => !!window.ChatKitFlask")
        listed = _send(page, "threads.list", {"limit": 5}, credentials="include")
    finally:
        mapped.close()

    assert created["ok"], created
    assert created["api"]["url"] == f"{service}/api/chatkit"
    assert not _errors(created), created
    assert "".join(d for _, d in _deltas(created)) == "You said: from the shop"
    assert [t["id"] for t in listed["answer"]["data"]] == [_thread_id(created)]
    assert model.count == 1
