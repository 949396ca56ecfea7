"""Limits cannot be dodged by address tricks, and rotating the cookie key logs nobody out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from chatkit_flask.identity import VisitorCookie, client_network
from chatkit_flask.service import create_app
from chatkit_flask.settings import ConfigError
from chatkit_flask.testing.fake_chatkit import FakeChatKit
from tests.conftest import TEST_API_KEY, WORKFLOW, base_config

URL = "/api/chatkit/secret"
COOKIE = "chatkit_session_id"
OLD_KEY = "old-cookie-signing-key-0001-of-32-bytes-or-more"
OLDER_KEY = "older-cookie-signing-key-0000-of-32-bytes-or-more"
NEW_KEY = "new-cookie-signing-key-0002-of-32-bytes-or-more"


def post(app: Flask, ip: str, cookie: str | None = None) -> int:
    client = app.test_client()
    if cookie:
        client.set_cookie(COOKIE, cookie)
    return client.post(URL, json={}, environ_base={"REMOTE_ADDR": ip}).status_code


# --- addresses --------------------------------------------------------------------------------


def test_ipv6_prefix_is_configurable(make_app: Callable[..., Flask], upstream: FakeChatKit) -> None:
    app = make_app(CHATKIT_RATELIMIT_PER_IP="2 per minute", CHATKIT_IPV6_PREFIX=56)
    assert post(app, "2001:db8:1:200::1") == 200
    assert post(app, "2001:db8:1:2ff:ffff::1") == 200  # another /64, same /56
    assert post(app, "2001:db8:1:2aa::7") == 429
    assert post(app, "2001:db8:1:300::1") == 200  # the next /56
    assert upstream.count == 3


def test_ipv4_mapped_ipv6_shares_the_ipv4_key(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    app = make_app(CHATKIT_RATELIMIT_PER_IP="2 per minute")
    assert post(app, "203.0.113.9") == 200
    assert post(app, "::ffff:203.0.113.9") == 200
    assert post(app, "::ffff:cb00:7109") == 429  # the same address, written in hex
    assert client_network("::ffff:203.0.113.9", 64) == "203.0.113.9"


@pytest.mark.parametrize(
    ("address", "prefix", "key"),
    [
        ("2001:db8::1", 64, "2001:db8::/64"),
        ("2001:db8:0:1234::1", 48, "2001:db8::/48"),
        ("2001:db8::1", 128, "2001:db8::1"),
        ("2001:db8::1%eth0", 64, "2001:db8::/64"),  # a zone id changes nothing
        ("not-an-ip", 64, "unknown"),
        ("", 64, "unknown"),
        ("198.51.100.7", 56, "198.51.100.7"),
    ],
)
def test_client_network_keys(address: str, prefix: int, key: str) -> None:
    assert client_network(address or None, prefix) == key


def test_forwarded_chain_longer_than_trusted_proxies_is_keyed_on_the_proxys_view(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    """Two trusted proxies: the client cannot pick its key by prepending addresses."""
    app = make_app(
        CHATKIT_RATELIMIT_PER_IP="2 per minute",
        CHATKIT_TRUSTED_PROXIES=2,
        CHATKIT_TRUSTED_PROXY_NETWORKS="10.0.0.0/8",
    )

    def via(chain: str) -> int:
        return (
            app.test_client()
            .post(
                URL,
                json={},
                headers={"X-Forwarded-For": chain},
                environ_base={"REMOTE_ADDR": "10.0.0.1"},
            )
            .status_code
        )

    assert via("198.51.100.20, 10.0.0.9") == 200
    assert via("6.6.6.6, 198.51.100.20, 10.0.0.9") == 200
    assert via("7.7.7.7, 198.51.100.20, 10.0.0.9") == 429  # still 198.51.100.20
    assert via("198.51.100.21, 10.0.0.9") == 200


# --- cookie key rotation ----------------------------------------------------------------------


def test_old_key_cookie_keeps_the_visitor_and_is_reissued_with_the_new_key(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    visitor_id, old_cookie = VisitorCookie(OLD_KEY, [], 3600).issue()
    app = make_app(SECRET_KEY=NEW_KEY, SECRET_KEY_FALLBACKS=f"{OLDER_KEY},{OLD_KEY}")
    client = app.test_client()
    client.set_cookie(COOKIE, old_cookie)
    response = client.post(URL, json={})
    assert response.status_code == 200
    assert upstream.last.json["user"] == f"visitor_{visitor_id}"  # not logged out
    new_cookie = client.get_cookie(COOKIE).value
    assert new_cookie != old_cookie
    assert VisitorCookie(NEW_KEY, [], 3600).verify(new_cookie) == (visitor_id, False)
    assert VisitorCookie(OLD_KEY, [], 3600).verify(new_cookie) == (None, False)
    # The re-issued cookie works and is not re-issued again.
    response = client.post(URL, json={})
    assert upstream.last.json["user"] == f"visitor_{visitor_id}"
    assert "Set-Cookie" not in response.headers


def test_rotation_keeps_the_per_visitor_limit(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    """The limit key is the visitor id, so re-signing does not reset the visitor's count."""
    _, old_cookie = VisitorCookie(OLD_KEY, [], 3600).issue()
    before = make_app(SECRET_KEY=OLD_KEY, CHATKIT_RATELIMIT_PER_USER="2 per minute")
    assert post(before, "198.51.100.1", old_cookie) == 200
    # The same storage is not shared between two memory:// apps, so count inside one app.
    after = make_app(
        SECRET_KEY=NEW_KEY, SECRET_KEY_FALLBACKS=OLD_KEY, CHATKIT_RATELIMIT_PER_USER="2 per minute"
    )
    assert [post(after, f"198.51.100.{i}", old_cookie) for i in range(3)] == [200, 200, 429]


def test_cookie_signed_with_a_dropped_key_is_a_new_visitor(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    visitor_id, old_cookie = VisitorCookie(OLD_KEY, [], 3600).issue()
    client = make_app(SECRET_KEY=NEW_KEY).test_client()
    client.set_cookie(COOKIE, old_cookie)
    assert client.post(URL, json={}).status_code == 200
    assert upstream.last.json["user"] != f"visitor_{visitor_id}"


def test_service_reads_fallbacks_from_env_as_a_comma_separated_list(upstream: FakeChatKit) -> None:
    environ = {
        "OPENAI_API_KEY": TEST_API_KEY,
        "SECRET_KEY": NEW_KEY,
        "SECRET_KEY_FALLBACKS": f" {OLDER_KEY} , {OLD_KEY},",
        "CHATKIT_WORKFLOW_ID": WORKFLOW,
        "CHATKIT_API_BASE": upstream.base_url,
        "CHATKIT_COOKIE_SECURE": "false",
    }
    app = create_app(environ=environ)
    assert app.extensions["chatkit"].settings.secret_key_fallbacks == (OLDER_KEY, OLD_KEY)
    assert app.config["SECRET_KEY_FALLBACKS"] == [OLDER_KEY, OLD_KEY]
    visitor_id, old_cookie = VisitorCookie(OLDER_KEY, [], 3600).issue()
    client = app.test_client()
    client.set_cookie(COOKIE, old_cookie)
    assert client.post(URL, json={}).status_code == 200
    assert upstream.last.json["user"] == f"visitor_{visitor_id}"


@pytest.mark.parametrize(
    "toml_value", [f'["{OLDER_KEY}", "{OLD_KEY}"]', f'"{OLDER_KEY},{OLD_KEY}"']
)
def test_service_reads_fallbacks_from_toml(
    upstream: FakeChatKit, tmp_path: Path, toml_value: str
) -> None:
    config = tmp_path / "chatkit.toml"
    config.write_text(f"SECRET_KEY_FALLBACKS = {toml_value}\n")
    environ = {
        "CHATKIT_CONFIG_FILE": str(config),
        "OPENAI_API_KEY": TEST_API_KEY,
        "SECRET_KEY": NEW_KEY,
        "CHATKIT_WORKFLOW_ID": WORKFLOW,
        "CHATKIT_API_BASE": upstream.base_url,
    }
    app = create_app(environ=environ)
    assert app.extensions["chatkit"].settings.secret_key_fallbacks == (OLDER_KEY, OLD_KEY)


def test_extension_accepts_a_list_in_app_config(upstream: FakeChatKit) -> None:
    app = create_app(base_config(upstream, SECRET_KEY=NEW_KEY, SECRET_KEY_FALLBACKS=[OLD_KEY]))
    assert app.extensions["chatkit"].settings.secret_key_fallbacks == (OLD_KEY,)


# --- cross-site requests ----------------------------------------------------------------------

EVIL = "http://evil.example.test"
SHOP = "https://shop.example.com"


@pytest.mark.parametrize(
    ("data", "content_type"), [("", "text/plain"), ("{}", "application/json")]
)
def test_foreign_origin_is_refused_without_fetch_metadata(
    client: FlaskClient, upstream: FakeChatKit, data: str, content_type: str
) -> None:
    """An old browser (no Sec-Fetch-Site) on another site cannot mint nor replace the cookie."""
    response = client.post(URL, data=data, content_type=content_type, headers={"Origin": EVIL})
    assert response.status_code == 403
    assert response.get_json()["error"] == "origin_not_allowed"
    assert "Set-Cookie" not in response.headers
    assert upstream.count == 0


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_post_must_be_json_even_when_empty(
    client: FlaskClient, upstream: FakeChatKit, content_type: str
) -> None:
    """HTML forms and simple fetches cannot send application/json without a CORS preflight."""
    response = client.post(URL, data="", content_type=content_type)
    assert response.status_code == 415
    assert response.get_json()["error"] == "unsupported_media_type"
    assert upstream.count == 0
    assert client.post(URL, data="", content_type="application/json").status_code == 200


def test_callers_without_origin_still_work(client: FlaskClient) -> None:
    assert client.post(URL, json={}).status_code == 200  # server to server, curl


def test_own_origin_behind_a_tls_proxy_is_the_sites_own(make_app: Callable[..., Flask]) -> None:
    """The scheme comes from X-Forwarded-Proto of a trusted proxy only."""
    app = make_app(CHATKIT_TRUSTED_PROXIES=1, CHATKIT_TRUSTED_PROXY_NETWORKS="10.0.0.0/8")

    def via(remote: str) -> int:
        return (
            app.test_client()
            .post(
                URL,
                json={},
                base_url="http://shop.example.com",
                headers={"Origin": SHOP, "X-Forwarded-Proto": "https"},
                environ_base={"REMOTE_ADDR": remote},
            )
            .status_code
        )

    assert via("10.0.0.2") == 200
    assert via("198.51.100.7") == 403  # not a proxy: the request came over http


def test_same_origin_fetch_metadata_vouches_for_the_origin(client: FlaskClient) -> None:
    headers = {"Origin": SHOP, "Sec-Fetch-Site": "same-origin"}  # a proxy rewrote the Host
    assert client.post(URL, json={}, headers=headers).status_code == 200
    headers = {"Origin": SHOP, "Sec-Fetch-Site": "same-site"}
    assert client.post(URL, json={}, headers=headers).status_code == 403


def test_own_origin_with_a_default_port_matches(client: FlaskClient) -> None:
    headers = {"Origin": "HTTP://Localhost:80"}
    assert client.post(URL, json={}, headers=headers).status_code == 200
    assert client.post(URL, json={}, headers={"Origin": "null"}).status_code == 403


def test_with_an_allowlist(make_app: Callable[..., Flask], upstream: FakeChatKit) -> None:
    client = make_app(CHATKIT_ALLOWED_ORIGINS=SHOP).test_client()

    def post(**headers: str) -> Any:
        return client.post(URL, json={}, headers=headers)

    listed = post(Origin=SHOP)
    assert listed.status_code == 200
    assert listed.headers["Access-Control-Allow-Origin"] == SHOP
    assert post(Origin=EVIL).status_code == 403
    assert post(Origin=EVIL, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    # A browser hiding its Origin on a cross-site request is refused too.
    assert post(**{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert post().status_code == 200  # no browser at all
    for response in (listed, post(Origin=EVIL), post()):
        assert "Origin" in response.vary
    assert upstream.count == 3  # the listed origin and the two posts without an Origin


# --- cookie tossing ---------------------------------------------------------------------------

HOST_COOKIE = f"__Host-{COOKIE}"


def test_a_secure_cookie_is_a_host_cookie(
    make_app: Callable[..., Flask], upstream: FakeChatKit
) -> None:
    """Only this host can set a __Host- cookie: a sibling subdomain cannot plant the visitor's."""
    client = make_app(CHATKIT_COOKIE_SECURE=True).test_client()
    response = client.post(URL, json={}, base_url="https://localhost")
    set_cookie = response.headers["Set-Cookie"]
    assert set_cookie.startswith(f"{HOST_COOKIE}=")
    assert "Secure" in set_cookie and "Path=/;" in set_cookie + ";"
    assert "Domain" not in set_cookie
    user = upstream.last.json["user"]
    client.post(URL, json={}, base_url="https://localhost")
    assert upstream.last.json["user"] == user  # read back under the same name
    # A plain-named cookie, as a sibling subdomain can set one, is not ours.
    _, tossed = VisitorCookie(NEW_KEY, [], 3600).issue()
    # use_cookies=False: werkzeug's test client otherwise drops a Cookie header it is given.
    app = make_app(SECRET_KEY=NEW_KEY, CHATKIT_COOKIE_SECURE=True)
    planted = app.test_client(use_cookies=False)
    planted.post(
        URL, json={}, base_url="https://localhost", headers={"Cookie": f"{COOKIE}={tossed}"}
    )
    assert upstream.last.json["user"] != f"visitor_{tossed.split('.')[0]}"


def test_plain_http_keeps_the_plain_name(client: FlaskClient) -> None:
    assert client.post(URL, json={}).headers["Set-Cookie"].startswith(f"{COOKIE}=")


@pytest.mark.parametrize(("secure", "name"), [(True, HOST_COOKIE), (False, COOKIE)])
def test_two_cookies_of_the_name_trust_neither(
    make_app: Callable[..., Flask],
    upstream: FakeChatKit,
    mint_logs: pytest.LogCaptureFixture,
    secure: bool,
    name: str,
) -> None:
    """The browser sends the planted cookie (longer Path) first; werkzeug keeps the first."""
    attacker_id, attacker = VisitorCookie(NEW_KEY, [], 3600).issue()
    victim_id, victim = VisitorCookie(NEW_KEY, [], 3600).issue()
    app = make_app(SECRET_KEY=NEW_KEY, CHATKIT_COOKIE_SECURE=secure)
    response = app.test_client(use_cookies=False).post(
        URL,
        json={},
        base_url="https://localhost",
        headers={"Cookie": f"{name}={attacker}; other=1; {name}={victim}"},
    )
    assert response.status_code == 200
    user = upstream.last.json["user"]
    assert user not in {f"visitor_{attacker_id}", f"visitor_{victim_id}"}
    assert response.headers["Set-Cookie"].startswith(f"{name}=")  # a new visitor
    warnings = [r.getMessage() for r in mint_logs.records if r.levelname == "WARNING"]
    assert any(f"2 cookies named {name}" in text for text in warnings), warnings
    logged = mint_logs.text
    for secret in (attacker, victim, attacker_id, victim_id):
        assert secret not in logged


@pytest.mark.parametrize("name", ["__Host-chat", "__Secure-chat"])
def test_a_prefixed_name_needs_a_secure_cookie(upstream: FakeChatKit, name: str) -> None:
    with pytest.raises(ConfigError, match="CHATKIT_COOKIE_NAME"):
        create_app(base_config(upstream, CHATKIT_COOKIE_NAME=name), environ={})
    app = create_app(
        base_config(upstream, CHATKIT_COOKIE_NAME=name, CHATKIT_COOKIE_SECURE=True), environ={}
    )
    response = app.test_client().post(URL, json={}, base_url="https://localhost")
    assert response.headers["Set-Cookie"].startswith(f"{name}=")
