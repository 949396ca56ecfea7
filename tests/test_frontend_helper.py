"""The frontend helper's files and the demo page, through Flask's test client (no browser)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from chatkit_flask import ChatKit
from chatkit_flask.demo import CHATKIT_CDN_URL
from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.conftest import base_config

STATIC = Path(__file__).resolve().parents[1] / "chatkit_flask" / "static"
JS_TYPES = {"text/javascript", "application/javascript"}
CORE = re.compile(r"// --- shared core[^\n]*\n(.*?)\n[ \t]*// --- end of shared core ---", re.S)


@pytest.mark.parametrize(
    ("filename", "types"),
    [
        ("chatkit-secret.js", JS_TYPES),
        ("chatkit-secret.mjs", JS_TYPES),
        ("demo.js", JS_TYPES),
        ("demo.css", {"text/css"}),
    ],
)
def test_helper_files_are_served_by_the_blueprint(
    make_app: Callable[..., Flask], filename: str, types: set[str]
) -> None:
    client = make_app().test_client()
    response = client.get(f"/api/chatkit/static/{filename}")
    assert response.status_code == 200
    assert response.mimetype in types
    assert response.data == (STATIC / filename).read_bytes()


def test_helper_follows_the_url_prefix(make_app: Callable[..., Flask]) -> None:
    client = make_app(CHATKIT_URL_PREFIX="/chat/v1").test_client()
    assert client.get("/chat/v1/static/chatkit-secret.js").status_code == 200
    assert client.get("/api/chatkit/static/chatkit-secret.js").status_code == 404


def test_plain_script_attaches_to_window_without_exports() -> None:
    source = (STATIC / "chatkit-secret.js").read_text()
    assert "root.ChatKitSecret = api" in source
    assert not re.search(r"^\s*(export|import)\b", source, re.M)


def test_es_module_shares_the_plain_scripts_code() -> None:
    plain = CORE.search((STATIC / "chatkit-secret.js").read_text())
    module = CORE.search((STATIC / "chatkit-secret.mjs").read_text())
    assert plain and module
    assert textwrap.dedent(plain.group(1)) == textwrap.dedent(module.group(1))
    assert (
        "export { ChatKitSecretError, createClientSecretFetcher"
        in (STATIC / "chatkit-secret.mjs").read_text()
    )


def test_helper_never_returns_the_current_secret() -> None:
    # The starter app's helper does `if (currentSecret) return currentSecret;`: never refreshes.
    source = (STATIC / "chatkit-secret.js").read_text()
    assert not re.search(r"return\s+currentClientSecret", source)


def test_demo_page_is_off_by_default_in_a_host_app_and_on_in_the_service(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    """A host app gets no page at / it did not ask for; the service shows a chat on a fresh
    start (config/chatkit.toml), and CHATKIT_DEMO=false turns it off."""
    host = Flask("host")
    host.config.update(base_config(upstream))
    ChatKit(host)
    assert host.test_client().get("/").status_code == 404
    assert make_app().test_client().get("/").status_code == 200
    assert make_app(CHATKIT_DEMO=False).test_client().get("/").status_code == 404


def test_demo_page_when_enabled(make_app: Callable[..., Flask]) -> None:
    client = make_app(CHATKIT_DEMO=True).test_client()
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert f'<script id="chatkit-cdn" src="{CHATKIT_CDN_URL}" async></script>' in html
    assert '<script src="/api/chatkit/static/chatkit-secret.js"></script>' in html
    assert 'data-endpoint="/api/chatkit/secret"' in html
    assert "<openai-chatkit" in html
    assert "Mint a test secret" in html
    assert "the chat itself needs OpenAI's service" in html
    # No inline script or style: the page must work under a strict CSP.
    assert all("src=" in tag for tag in re.findall(r"<script\b[^>]*>", html))
    assert "<style" not in html
    assert " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)


def test_demo_page_follows_the_url_prefix(make_app: Callable[..., Flask]) -> None:
    client = make_app(CHATKIT_DEMO="true", CHATKIT_URL_PREFIX="/chat").test_client()
    html = client.get("/").get_data(as_text=True)
    assert 'data-endpoint="/chat/secret"' in html
    assert '<script src="/chat/static/chatkit-secret.js"></script>' in html


def test_demo_page_is_not_rate_limited(make_app: Callable[..., Flask]) -> None:
    client = make_app(
        CHATKIT_DEMO=True,
        CHATKIT_RATELIMIT_PER_IP="1 per minute",
        CHATKIT_RATELIMIT_GLOBAL="1/hour",
    ).test_client()
    assert [client.get("/").status_code for _ in range(4)] == [200] * 4


def test_hosted_config_names_the_backend_and_issues_the_cookie(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(CHATKIT_URL_PREFIX="/chat").test_client()
    response = client.get("/chat/config")
    assert response.status_code == 200
    assert response.json == {"backend": "hosted", "secretUrl": "/chat/secret"}
    assert response.headers["Cache-Control"] == "no-store"
    assert "chatkit_session_id=" in response.headers["Set-Cookie"]
    assert "HttpOnly" in response.headers["Set-Cookie"]


@pytest.mark.parametrize(("key", "expected"), [("", "domain_pk_localhost_dev"), ("dpk_1", "dpk_1")])
def test_server_config_gives_url_and_domain_key(
    make_app: Callable[..., Flask], tmp_path: Path, key: str, expected: str
) -> None:
    client = make_app(
        CHATKIT_BACKEND="server",
        CHATKIT_STORE_URL=f"sqlite:///{tmp_path}/threads.db",
        CHATKIT_DOMAIN_KEY=key,
    ).test_client()
    response = client.get("/api/chatkit/config")
    assert response.status_code == 200
    assert response.json == {"backend": "server", "url": "/api/chatkit", "domainKey": expected}
    assert "chatkit_session_id=" in response.headers["Set-Cookie"]


def test_config_refuses_cross_site_pages(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    response = client.get("/api/chatkit/config", headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 403
    assert response.json["error"] == "origin_not_allowed"


def test_demo_page_in_server_mode(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    client = make_app(
        CHATKIT_DEMO=True,
        CHATKIT_BACKEND="server",
        CHATKIT_STORE_URL=f"sqlite:///{tmp_path}/threads.db",
    ).test_client()
    response = client.get("/")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "'unsafe-inline'" not in response.headers["Content-Security-Policy"]
    assert 'data-backend="server"' in html
    assert 'data-prefix="/api/chatkit"' in html
    assert 'id="try-form"' in html and 'id="mint"' not in html
    assert "could not be loaded from OpenAI's CDN" in html
    assert all("src=" in tag for tag in re.findall(r"<script\b[^>]*>", html))
    assert " style=" not in html and not re.search(r"\son[a-z]+=", html)
