"""Attachments from a real browser: headless Chromium (Playwright) on a page served by the app
under test (same origin, the visitor cookie the extension issues), the fake model on loopback,
bytes on a local directory and on moto's S3 server.

chatkit-js's bundle comes from OpenAI's CDN, blocked here, so ``<openai-chatkit>`` never runs.
The page's script does what chatkit-js does with ``api.uploadStrategy: {type: "two_phase"}``:
``attachments.create`` through the ``api`` that ``ChatKitFlask.configure()`` gives the widget,
a ``multipart/form-data`` POST of the chosen ``File`` (field ``file``) to the upload
descriptor's URL with its method and headers, then ``threads.create`` naming the attachment,
reading the event stream. The file comes from an ``<input type=file>`` (Playwright's
``set_input_files``): its name, size and type are the ones Chromium gives it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("chatkit")
pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests")

from conftest import TEST_SECRET_KEY
from flask import Flask

from chatkit_flask.service import create_app
from chatkit_flask.testing.fake_responses import FakeResponses
from chatkit_flask.testing.s3_server import S3Server
from tests.attachment_support import files_backend, s3_server
from tests.browser_support import browser_contexts, launch_browser, wsgi_servers
from tests.test_attachments import png

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MODEL_KEY = "test-model-key-not-a-real-one"
COOKIE = "chatkit_session_id"
MAX_BYTES = 4096
PNG = png(4, 4)
PAGE = "/attach-test"

# A test-only page: a file input, a text input, and the reply as it streams. Its script is
# the part of chatkit-js an attachment goes through; every step's refusal is kept as the JSON
# the server sent (status, error, message).
PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attach</title></head><body>
<input id="file" type="file">
<input id="text" type="text" value="What is in this picture?">
<button id="send" type="button">Send</button>
<ol id="transcript"></ol>
<script src="/api/chatkit/static/chatkit-secret.js"></script>
<script>
"use strict";
const apiReady = ChatKitFlask.configure();  // GET /api/chatkit/config: issues the cookie

function show(who, text) {
  const li = document.createElement("li");
  li.dataset.who = who;
  li.textContent = text;
  document.getElementById("transcript").appendChild(li);
  return li;
}

async function refusal(response) {
  const body = await response.json();
  show("error", body.message);
  return { status: response.status, error: body.error, message: body.message };
}

// chatkit-js's two phases for the chosen file. `declare` overrides what attachments.create
// says about it (a page that lies about the size).
async function attach(declare) {
  const api = await apiReady;
  const file = document.getElementById("file").files[0];
  const params = { name: file.name, size: file.size, mime_type: file.type, ...(declare || {}) };
  let attachment;
  try {
    attachment = await ChatKitFlask.send(api, "attachments.create", params);
  } catch (e) {  // a JSON refusal, read by the helper
    show("error", e.message);
    return { step: "create", params, refused: { status: e.status, error: e.code,
                                                 message: e.message } };
  }
  const descriptor = attachment.upload_descriptor;
  const form = new FormData();
  form.append("file", file);
  const response = await fetch(descriptor.url, { method: descriptor.method,
                                                 headers: descriptor.headers, body: form });
  if (!response.ok) {
    return { step: "upload", params, attachment, refused: await refusal(response) };
  }
  return { step: "done", params, attachment, uploaded: await response.json() };
}

// A message naming attachments, as chatkit-js sends it; the reply shows as it streams.
async function send(attachmentIds) {
  const api = await apiReady;
  const text = document.getElementById("text").value;
  show("you", text);
  const body = { type: "threads.create", params: { input: {
    content: [{ type: "input_text", text }], attachments: attachmentIds,
    inference_options: {} } } };
  const raw = await fetch(api.url, { method: "POST", body: JSON.stringify(body),
                                     headers: { "Content-Type": "application/json" } });
  if (!raw.headers.get("Content-Type").startsWith("text/event-stream")) {
    return { refused: await refusal(raw) };
  }
  const reply = show("assistant", "");
  const events = [];
  const reader = raw.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const frames = buffer.split("\\n\\n");
    buffer = frames.pop();
    for (const frame of frames) {
      if (!frame.startsWith("data: ")) continue;
      const event = JSON.parse(frame.slice(6));
      events.push(event);
      if (event.type === "thread.item.updated" && event.update.delta) {
        reply.textContent += event.update.delta;
      }
    }
  }
  return { events };
}

document.getElementById("send").addEventListener("click", async () => {
  const attached = await attach();
  window.lastRound = attached.step === "done"
    ? { attached, sent: await send([attached.attachment.id]) } : { attached };
});
</script></body></html>"""

# What a page can do with another visitor's attachment id and links.
STRANGER = """async ({ id, uploadUrl, previewUrl }) => {
  const api = await ChatKitFlask.configure();
  const json = async (r) => ({ status: r.status, body: await r.json() });
  const post = (body) => fetch(api.url, { method: "POST", body: JSON.stringify(body),
                                          headers: { "Content-Type": "application/json" } });
  const input = { content: [{ type: "input_text", text: "whose is this?" }], attachments: [id],
                  inference_options: {} };
  const used = await json(await post({ type: "threads.create", params: { input } }));
  // The same message through the widget's fetch: the refusal as chatkit-js would show it.
  const shown = await ChatKitFlask.send(api, "threads.create", { input });
  const deleted = await json(await post({ type: "attachments.delete",
                                          params: { attachment_id: id } }));
  const form = new FormData();
  form.append("file", new Blob([document.title], { type: "image/png" }), "mine.png");
  const reused = await json(await fetch(uploadUrl, { method: "POST", body: form }));
  const forged = await fetch(previewUrl.slice(0, -4) + (previewUrl.endsWith("AAAA") ? "BBBB"
                                                                                    : "AAAA"));
  return { used, shown, deleted, reused,
           forged: { status: forged.status, type: forged.headers.get("Content-Type"),
                     body: await forged.text() } };
}"""


# ------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


@pytest.fixture
def new_context(browser: Any) -> Iterator[Callable[[], Any]]:
    yield from browser_contexts(browser)


@pytest.fixture(scope="module")
def model() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=MODEL_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    yield from s3_server()


@pytest.fixture(params=["local", "s3"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Where attachment bytes go, and ``stored()``: the names stored there."""
    return files_backend(request, tmp_path, monkeypatch, local_files="*")


@pytest.fixture
def stored(backend: dict[str, Any]) -> Callable[[], list[str]]:
    return backend["stored"]


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    yield from wsgi_servers()


@pytest.fixture
def start(
    model: FakeResponses, backend: dict[str, Any], serve: Callable[[Flask], str], tmp_path: Path
) -> Iterator[Callable[..., str]]:
    """``start(**config)`` -> the base URL of server mode with attachments on, the test page
    at ``/attach-test``."""
    model.clear()
    apps: list[Flask] = []

    def run(**overrides: Any) -> str:
        config = {
            "CHATKIT_BACKEND": "server",
            "OPENAI_API_KEY": MODEL_KEY,
            "OPENAI_BASE_URL": model.base_url,
            "SECRET_KEY": TEST_SECRET_KEY,
            "CHATKIT_STORE_URL": f"sqlite:///{tmp_path}/threads.db",
            "CHATKIT_AGENT_INSTRUCTIONS": "Echo the visitor.",
            "CHATKIT_COOKIE_SECURE": False,
            "CHATKIT_TITLE_MODEL": "off",
            "CHATKIT_ATTACHMENTS": True,
            "CHATKIT_ATTACHMENT_MAX_BYTES": MAX_BYTES,
            "RATELIMIT_STORAGE_URI": "memory://",
            **backend["config"],
            **overrides,
        }
        app = create_app(config, environ={})
        app.add_url_rule(PAGE, "attach_test", lambda: PAGE_HTML)
        apps.append(app)
        return serve(app)

    yield run
    for app in apps:
        app.extensions["chatkit"].server.bridge.close()


def _open(ctx: Any, base: str) -> Any:
    page = ctx.new_page()
    page.goto(base + PAGE)
    page.wait_for_function("() => !!window.ChatKitFlask")
    return page


def _choose(page: Any, tmp_path: Path, name: str, data: bytes) -> None:
    """Put a file named ``name`` holding ``data`` into the page's file input (Chromium
    gives it its type from the name, as it does for a visitor's file)."""
    path = tmp_path / "upload" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    page.set_input_files("#file", str(path))


def _attach(page: Any, declare: dict[str, Any] | None = None) -> dict[str, Any]:
    return page.evaluate("(declare) => attach(declare)", declare)


# ---------------------------------------------------------------------- tests
def test_a_browser_attaches_an_image_and_the_model_receives_it(
    new_context: Callable[[], Any], start: Callable[..., str], model: FakeResponses,
    stored: Callable[[], list[str]], tmp_path: Path,
) -> None:  # fmt: skip
    base = start()
    ctx = new_context()
    page = _open(ctx, base)
    _choose(page, tmp_path, "photo.png", PNG)

    page.click("#send")
    page.wait_for_function("() => !!window.lastRound")
    page.wait_for_function(
        "() => document.querySelector('#transcript li[data-who=assistant]')?.textContent"
        " === 'You said: What is in this picture?'"
    )
    round_trip = page.evaluate("window.lastRound")

    attached = round_trip["attached"]
    assert attached["step"] == "done", attached
    assert attached["params"] == {"name": "photo.png", "size": len(PNG), "mime_type": "image/png"}
    attachment = attached["attachment"]
    assert attachment["type"] == "image"
    assert attachment["upload_descriptor"]["method"] == "POST"
    upload = urlsplit(attachment["upload_descriptor"]["url"])
    assert f"{upload.scheme}://{upload.netloc}" == base  # same origin: under the ChatKit prefix
    assert upload.path.startswith("/api/chatkit/uploads/")
    assert attached["uploaded"]["upload_descriptor"] is None
    assert stored() == [attachment["id"]]
    # The cookie the extension issued (httpOnly) carried the visitor through every step.
    cookie = {c["name"]: c for c in ctx.cookies(base)}[COOKIE]
    assert cookie["httpOnly"] is True

    events = round_trip["sent"]["events"]
    user = next(
        e["item"]
        for e in events
        if e["type"] == "thread.item.done" and e["item"]["type"] == "user_message"
    )
    assert [a["id"] for a in user["attachments"]] == [attachment["id"]]
    (image,) = model.input_parts("input_image")
    assert image["image_url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert model.count == 1

    # The preview the thread names is the same bytes, served as an image only.
    preview = page.evaluate(
        """async (url) => { const r = await fetch(url);
             return { status: r.status, type: r.headers.get("Content-Type"),
                      size: (await r.arrayBuffer()).byteLength }; }""",
        user["attachments"][0]["preview_url"],
    )
    assert preview == {"status": 200, "type": "image/png", "size": len(PNG)}


def test_an_oversized_file_is_refused_and_nothing_is_stored(
    new_context: Callable[[], Any], start: Callable[..., str], model: FakeResponses,
    stored: Callable[[], list[str]], tmp_path: Path,
) -> None:  # fmt: skip
    base = start()
    page = _open(new_context(), base)
    big = PNG + bytes(MAX_BYTES)
    _choose(page, tmp_path, "huge.png", big)

    refused = _attach(page)

    assert refused["step"] == "create"
    assert refused["refused"] == {
        "status": 413,
        "error": "too_large",
        "message": f"The file is larger than allowed ({MAX_BYTES} bytes).",
    }
    # A page that declares less than it sends: stopped while the bytes stream in.
    lied = _attach(page, {"size": len(PNG)})
    assert lied["step"] == "upload"
    assert lied["refused"]["status"] == 413 and lied["refused"]["error"] == "too_large"
    assert lied["refused"]["message"] == f"The file is larger than allowed ({len(PNG)} bytes)."
    assert stored() == []
    # The half-uploaded attachment cannot be sent.
    unready = page.evaluate("(id) => send([id])", lied["attachment"]["id"])
    assert unready["refused"] == {
        "status": 400,
        "error": "attachment_not_ready",
        "message": "An attachment has not finished uploading.",
    }
    shown = page.locator('#transcript li[data-who="error"]').all_inner_texts()
    assert shown[0].startswith("The file is larger than allowed")
    assert model.count == 0


def test_a_file_named_png_holding_text_is_refused_and_nothing_is_stored(
    new_context: Callable[[], Any], start: Callable[..., str], model: FakeResponses,
    stored: Callable[[], list[str]], tmp_path: Path,
) -> None:  # fmt: skip
    base = start()
    page = _open(new_context(), base)
    text = b"<!DOCTYPE html><html><script>alert(document.cookie)</script></html>\n" * 8
    _choose(page, tmp_path, "cat.png", text)

    refused = _attach(page)

    # Chromium declares it image/png from its name; the bytes say otherwise.
    assert refused["params"] == {"name": "cat.png", "size": len(text), "mime_type": "image/png"}
    assert refused["step"] == "upload"
    assert refused["refused"] == {
        "status": 415,
        "error": "unsupported_type",
        "message": "The file's content is not of an allowed type.",
    }
    assert stored() == []
    # Declared as what it is, it is refused before any upload.
    _choose(page, tmp_path, "page.html", text)
    declared = _attach(page)
    assert declared["step"] == "create"
    assert declared["params"]["mime_type"] == "text/html"
    assert declared["refused"] == {
        "status": 415,
        "error": "unsupported_type",
        "message": "This kind of file cannot be attached here.",
    }
    assert stored() == []
    assert model.count == 0


def test_another_visitors_browser_cannot_use_delete_or_forge_the_attachment(
    new_context: Callable[[], Any], start: Callable[..., str], model: FakeResponses,
    stored: Callable[[], list[str]], tmp_path: Path,
) -> None:  # fmt: skip
    base = start()
    owner = _open(new_context(), base)
    _choose(owner, tmp_path, "photo.png", PNG)
    attached = _attach(owner)
    assert attached["step"] == "done", attached
    attachment = attached["attachment"]
    stranger = _open(new_context(), base)  # another browser context: another visitor

    tried = stranger.evaluate(STRANGER, {
        "id": attachment["id"], "uploadUrl": attachment["upload_descriptor"]["url"],
        "previewUrl": attachment["preview_url"]})  # fmt: skip

    not_found = {"error": "not_found", "message": "No such attachment."}
    assert tried["used"]["status"] == 404
    assert {k: tried["used"]["body"][k] for k in not_found} == not_found
    # What the widget would show in the thread: the server's words, in one error event.
    assert tried["shown"] == [
        {"type": "error", "code": "custom", "message": "No such attachment.", "allow_retry": False}
    ]
    assert tried["deleted"]["status"] == 404
    assert {k: tried["deleted"]["body"][k] for k in not_found} == not_found
    assert tried["reused"]["status"] == 410 and tried["reused"]["body"]["error"] == "upload_used"
    assert tried["forged"]["status"] == 404
    assert tried["forged"]["type"] == "application/json"
    assert '"No such attachment."' in tried["forged"]["body"]
    assert model.count == 0
    # The owner's bytes are untouched, and the stranger stored none.
    assert stored() == [attachment["id"]]
    preview = owner.evaluate(
        "async (url) => (await (await fetch(url)).arrayBuffer()).byteLength",
        attachment["preview_url"],
    )
    assert preview == len(PNG)
    # The owner can still send it.
    sent = owner.evaluate("(id) => send([id])", attachment["id"])
    assert sent["events"][-1]["type"] == "thread.item.done", sent
    assert len(model.input_parts("input_image")) == 1


# A stand-in for <openai-chatkit> (its CDN bundle cannot load here) that keeps the options.
CHATKIT_ELEMENT_STUB = """customElements.define("openai-chatkit", class extends HTMLElement {
  setOptions(options) { window.chatkitOptions = options; }
});"""


@pytest.mark.parametrize("backend", ["local"], indirect=True)
@pytest.mark.parametrize("attachments", [True, False])
def test_the_demo_page_turns_on_the_composers_upload_button_when_the_server_takes_files(
    new_context: Callable[[], Any], start: Callable[..., str], attachments: bool
) -> None:
    base = start(CHATKIT_DEMO=True, CHATKIT_ATTACHMENTS=attachments)
    ctx = new_context()
    ctx.add_init_script(CHATKIT_ELEMENT_STUB)
    page = ctx.new_page()
    page.goto(base + "/")
    page.wait_for_function("() => !!window.chatkitOptions")

    given = page.evaluate(
        """async () => ({ composer: window.chatkitOptions.composer || null,
                         uploadStrategy: window.chatkitOptions.api.uploadStrategy || null,
                         config: await (await fetch("/api/chatkit/config")).json() })"""
    )

    if not attachments:
        assert given["composer"] is None and given["uploadStrategy"] is None
        return
    assert given["uploadStrategy"] == {"type": "two_phase"}
    assert given["composer"] == {"attachments": given["config"]["attachments"]}
    assert given["composer"]["attachments"]["enabled"] is True
    assert given["composer"]["attachments"]["maxSize"] == MAX_BYTES
    assert "image/png" in given["composer"]["attachments"]["accept"]
