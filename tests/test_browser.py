"""Real-browser tests of the secret flow: headless Chromium (Debian's ``chromium`` package)
driven by Playwright, against the service on a real socket, the fake ChatKit API and real Redis.

OpenAI's CDN is blocked in every test (the page must cope, and no chat widget may mint secrets
behind the tests' back); the tests drive ``chatkit-secret.js`` on the demo page.

Screenshot: ``test-artifacts/demo.png``; set ``CHATKIT_UPDATE_SCREENSHOT=1`` to also refresh
``docs/demo.png``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS_URL, base_config
from flask import Flask

from chatkit_flask.service import create_app
from chatkit_flask.testing.fake_chatkit import Behaviour, FakeChatKit
from tests.browser_support import CDN_PATTERN, launch_browser, wsgi_servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
COOKIE = "chatkit_session_id"

# page.evaluate snippets: errors come back as plain objects so assertions can read them.
MINT = """async ({ current, options }) => {
  const getClientSecret = ChatKitSecret.createClientSecretFetcher(options || {});
  try {
    return { ok: true, secret: await getClientSecret(current) };
  } catch (e) {
    return { ok: false, name: e.name, isError: e instanceof Error,
             isSecretError: e instanceof ChatKitSecret.ChatKitSecretError, status: e.status,
             code: e.code, retryAfter: e.retryAfter, requestId: e.requestId, message: e.message };
  }
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_browser()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 820, "height": 900})
    ctx.set_default_timeout(15_000)
    ctx.route(CDN_PATTERN, lambda route: route.abort())
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: Any) -> Any:
    return context.new_page()


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    yield from wsgi_servers()


@pytest.fixture
def start_service(
    upstream: FakeChatKit, real_redis: Any, serve: Callable[..., str]
) -> Callable[..., str]:
    """Start the standalone service (demo page on, real Redis) on a real socket -> base URL."""

    def start(**overrides: Any) -> str:
        config = base_config(
            upstream,
            CHATKIT_DEMO=True,
            RATELIMIT_STORAGE_URI=REDIS_URL,
            TESTING=False,
            **overrides,
        )
        app: Flask = create_app(config, environ={})
        return serve(app)

    return start


def _open_demo(page: Any, base: str) -> None:
    page.goto(f"{base}/", wait_until="domcontentloaded")
    page.wait_for_function("() => !!window.ChatKitSecret && !!window.chatkitDemo")


def _mint(page: Any, current: str | None = None, **options: Any) -> dict[str, Any]:
    return page.evaluate(MINT, {"current": current, "options": options})


def test_helper_mints_and_the_visitor_cookie_is_httponly(
    page: Any, context: Any, start_service: Callable[..., str], upstream: FakeChatKit
) -> None:
    base = start_service()
    _open_demo(page, base)

    result = _mint(page)

    assert result["ok"], result
    assert result["secret"].startswith("ek_")
    assert upstream.count == 1
    cookies = {c["name"]: c for c in context.cookies(base)}
    assert COOKIE in cookies
    assert cookies[COOKIE]["httpOnly"] is True
    assert cookies[COOKIE]["sameSite"] == "Lax"
    assert COOKIE not in page.evaluate("document.cookie")


def test_reload_keeps_the_visitor_and_refresh_mints_a_new_secret(
    page: Any, start_service: Callable[..., str], upstream: FakeChatKit
) -> None:
    base = start_service()
    _open_demo(page, base)
    first = _mint(page)
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function("() => !!window.ChatKitSecret")
    second = _mint(page)
    refreshed = _mint(page, current=second["secret"])

    assert first["ok"] and second["ok"] and refreshed["ok"]
    assert len({first["secret"], second["secret"], refreshed["secret"]}) == 3
    users = [r.json["user"] for r in upstream.requests]
    assert len(users) == 3
    assert users[0] == users[1] == users[2]


def test_over_the_visitor_limit_the_helper_and_status_box_say_when_to_retry(
    page: Any, start_service: Callable[..., str], upstream: FakeChatKit
) -> None:
    base = start_service(CHATKIT_RATELIMIT_PER_USER="2 per minute")
    _open_demo(page, base)
    assert _mint(page)["ok"]
    assert _mint(page)["ok"]

    limited = _mint(page)

    assert not limited["ok"]
    assert limited["isError"] and limited["isSecretError"]
    assert limited["name"] == "ChatKitSecretError"
    assert limited["status"] == 429
    assert limited["code"] == "rate_limited"
    # The window is 60 s; the server rounds the reset time up, so 61 is possible.
    assert 0 < limited["retryAfter"] <= 61
    assert limited["message"] == (
        f"Too many chat sessions. Try again in {limited['retryAfter']} seconds."
        if limited["retryAfter"] != 1
        else "Too many chat sessions. Try again in 1 second."
    )
    assert limited["requestId"]
    assert upstream.count == 2

    page.click("#mint")
    status = page.locator('#status[data-kind="error"]')
    status.wait_for()
    assert "Too many chat sessions. Try again in" in status.inner_text()
    assert "second" in status.inner_text()


def test_upstream_busy_is_retried_after_retry_after(
    page: Any, start_service: Callable[..., str], upstream: FakeChatKit
) -> None:
    base = start_service()
    _open_demo(page, base)
    upstream.enqueue(Behaviour.rate_limited(retry_after=1))  # -> 503 upstream_busy, Retry-After: 1

    result = page.evaluate(
        """async () => {
          const statuses = [];
          const getClientSecret = ChatKitSecret.createClientSecretFetcher({
            fetch: async (url, init) => {
              const response = await fetch(url, init);
              statuses.push(response.status);
              return response;
            },
          });
          const started = performance.now();
          const secret = await getClientSecret(null);
          return { secret, statuses, ms: performance.now() - started };
        }"""
    )

    assert result["statuses"] == [503, 200]
    assert result["secret"].startswith("ek_")
    assert result["ms"] >= 950  # honoured Retry-After: 1
    assert upstream.count == 2


def _tiny_page(service: str) -> Callable[..., Any]:
    html = (
        "<!doctype html><title>other site</title>"
        f'<script src="{service}/api/chatkit/static/chatkit-secret.js"></script>'
    ).encode()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(
            "200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(html)))]
        )
        return [html]

    return app


def test_cross_origin_pages_mint_only_when_allowed(
    browser: Any,
    context: Any,
    upstream: FakeChatKit,
    real_redis: Any,
    serve: Callable[..., str],
) -> None:
    # Ports first: the allowlist names the allowed page's origin. The service is 127.0.0.1,
    # the other pages are "localhost": other origins and other sites.
    holder: dict[str, Any] = {}

    def service_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return holder["app"](environ, start_response)

    service = serve(service_app)
    allowed = serve(_tiny_page(service), host="localhost")
    denied = serve(_tiny_page(service), host="localhost")
    holder["app"] = create_app(
        base_config(
            upstream,
            CHATKIT_ALLOWED_ORIGINS=allowed,
            RATELIMIT_STORAGE_URI=REDIS_URL,
            TESTING=False,
        ),
        environ={},
    )
    endpoint = f"{service}/api/chatkit/secret"
    options = {"endpoint": endpoint, "credentials": "include", "retries": 0}

    page = context.new_page()
    page.goto(f"{denied}/")
    page.wait_for_function("() => !!window.ChatKitSecret")
    refused = _mint(page, **options)
    # A "simple" request needs no preflight: the server itself must refuse it.
    no_cors = page.evaluate(
        """async (url) => {
          const r = await fetch(url, { method: "POST", mode: "no-cors", credentials: "include" });
          return r.type;
        }""",
        endpoint,
    )
    assert not refused["ok"]
    assert refused["code"] == "network_error"  # CORS: the browser may not even read the answer
    assert no_cors == "opaque"
    assert upstream.count == 0

    page.goto(f"{allowed}/")
    page.wait_for_function("() => !!window.ChatKitSecret")
    minted = _mint(page, **options)
    assert minted["ok"], minted
    assert upstream.count == 1

    # The allowed page can read error answers too (Retry-After is exposed by CORS).
    upstream.enqueue(Behaviour.rate_limited(retry_after=30))
    busy = _mint(page, **options)
    assert busy["status"] == 503
    assert busy["code"] == "upstream_busy"
    assert busy["retryAfter"] == 30


def test_helper_contract_with_a_stub_fetch(page: Any, start_service: Callable[..., str]) -> None:
    """Request shape, retries and error mapping, with scripted answers (no server round trip)."""
    base = start_service()
    _open_demo(page, base)
    result = page.evaluate(
        """async () => {
          const json = (status, body, headers = {}) => new Response(JSON.stringify(body), {
            status, headers: { "Content-Type": "application/json", ...headers } });
          function scripted(...answers) {
            const calls = [];
            const fetch = async (url, init) => {
              calls.push({ url, method: init.method, credentials: init.credentials,
                           contentType: init.headers["Content-Type"], body: init.body });
              const next = answers.shift();
              if (next instanceof Error) throw next;
              return next;
            };
            return { calls, fetch };
          }
          async function run(stub, options, current = null) {
            const get = ChatKitSecret.createClientSecretFetcher({ backoffMs: 5, ...options,
                                                                  fetch: stub.fetch });
            try { return { ok: true, secret: await get(current), calls: stub.calls }; }
            catch (e) {
              return { ok: false, calls: stub.calls, status: e.status, code: e.code,
                       retryAfter: e.retryAfter, requestId: e.requestId, message: e.message,
                       isSecretError: e instanceof ChatKitSecret.ChatKitSecretError };
            }
          }
          const out = {};
          out.refresh = await run(scripted(json(200, { client_secret: "ek_new" })),
                                  { body: { workflow_id: "wf_other" } }, "ek_old");
          out.defaults = await run(scripted(json(200, { client_secret: "ek_a" })), {});
          out.timeout_then_ok = await run(
            scripted(json(504, { error: "upstream_timeout" }),
                     json(200, { client_secret: "ek_b" })),
            {});
          out.network = await run(
            scripted(new TypeError("Failed to fetch"), new TypeError("x"), new TypeError("y")), {});
          out.long_retry_after = await run(
            scripted(json(503, { error: "upstream_busy", message: "The chat service is busy.",
                                 retry_after: 60, request_id: "rid-1" }, { "Retry-After": "60" })),
            {});
          out.forbidden = await run(
            scripted(json(403, { error: "origin_not_allowed",
                                 message: "This origin may not use the chat.",
                                 request_id: "rid-2" })), {});
          out.limited_header_only = await run(
            scripted(json(429, { error: "rate_limited" }, { "Retry-After": "42" })), {});
          out.no_secret = await run(scripted(json(200, { expires_at: 1 })), {});
          out.not_json = await run(
            scripted(new Response("<html>bad gateway</html>", { status: 502 })), {});
          const mod = await import(
            new URL("/api/chatkit/static/chatkit-secret.mjs", location.href).href);
          out.esm = await run(scripted(json(200, { client_secret: "ek_esm" })),
                              { }, null);
          out.esmExports = [typeof mod.createClientSecretFetcher, typeof mod.ChatKitSecretError,
                            typeof mod.default.createClientSecretFetcher];
          return out;
        }"""
    )

    refresh = result["refresh"]
    assert refresh["ok"] and refresh["secret"] == "ek_new"  # never the current secret
    assert refresh["calls"] == [
        {
            "url": "/api/chatkit/secret",
            "method": "POST",
            "credentials": "same-origin",
            "contentType": "application/json",
            "body": '{"workflow_id":"wf_other"}',
        }
    ]
    assert result["defaults"]["calls"][0]["body"] == "{}"
    assert result["timeout_then_ok"]["ok"] and len(result["timeout_then_ok"]["calls"]) == 2

    network = result["network"]
    assert not network["ok"] and network["isSecretError"]
    assert (network["status"], network["code"], len(network["calls"])) == (0, "network_error", 3)

    busy = result["long_retry_after"]  # longer than maxRetryDelayMs: not waited for
    assert (busy["status"], busy["code"], busy["retryAfter"]) == (503, "upstream_busy", 60)
    assert busy["message"] == "The chat service is busy."
    assert busy["requestId"] == "rid-1"
    assert len(busy["calls"]) == 1

    forbidden = result["forbidden"]
    assert (forbidden["status"], forbidden["code"]) == (403, "origin_not_allowed")
    assert forbidden["message"] == "This origin may not use the chat."
    assert forbidden["requestId"] == "rid-2"
    assert len(forbidden["calls"]) == 1

    limited = result["limited_header_only"]
    assert limited["retryAfter"] == 42
    assert limited["message"] == "Too many chat sessions. Try again in 42 seconds."

    assert result["no_secret"]["code"] == "invalid_response"
    assert result["not_json"]["status"] == 502
    assert result["not_json"]["code"] == "http_502"
    assert result["not_json"]["message"] == "The chat service is unavailable. Try again later."
    assert result["esmExports"] == ["function", "function", "function"]


def test_demo_page_screenshot(page: Any, start_service: Callable[..., str]) -> None:
    base = start_service()
    _open_demo(page, base)
    page.locator("#chat-unavailable").wait_for(state="visible")
    assert "the chat itself needs OpenAI's service" in page.inner_text("#chat-unavailable")
    page.click("#mint")
    page.locator("#minted li").first.wait_for()
    page.click("#mint")
    page.locator("#minted li").nth(1).wait_for()
    status = page.locator("#status")
    assert status.get_attribute("data-kind") == "ok"
    assert "Minted ek_fake_" in status.inner_text()
    first, second = page.locator("#minted li").all_inner_texts()
    assert "\u2026" in first and "expires_at" in first and "(refresh)" in second
    assert len(first.split("\u2026")[0]) == 8  # masked: first 8 characters only

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo.png"
    page.set_viewport_size({"width": 820, "height": 560})  # full_page grows it to the content
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
    docs = REPO_ROOT / "docs" / "demo.png"
    if os.environ.get("CHATKIT_UPDATE_SCREENSHOT") or not docs.exists():
        docs.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, docs)


def test_helper_default_endpoint_follows_the_url_prefix(
    page: Any, start_service: Callable[..., str], upstream: FakeChatKit
) -> None:
    """With no ``endpoint`` option, both builds of the served helper mint from the prefix they
    were served under (here /chat/v1, not the default /api/chatkit)."""
    base = start_service(CHATKIT_URL_PREFIX="/chat/v1")
    _open_demo(page, base)
    assert page.evaluate("() => document.querySelector('script[src*=chatkit-secret]').src") == (
        f"{base}/chat/v1/static/chatkit-secret.js"
    )
    plain = _mint(page)
    module = page.evaluate(
        """async () => {
          const m = await import("/chat/v1/static/chatkit-secret.mjs");
          return await m.createClientSecretFetcher()(null);
        }"""
    )
    assert plain["ok"], plain
    assert module.startswith("ek_")
    assert upstream.count == 2
    assert all(r.path == "/v1/chatkit/sessions" for r in upstream.requests)
