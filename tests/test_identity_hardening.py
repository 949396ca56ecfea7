"""Limits cannot be dodged by address tricks, and rotating the cookie key logs nobody out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from chatkit_flask.identity import VisitorCookie, client_network
from chatkit_flask.service import create_app
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
    return client.post(URL, environ_base={"REMOTE_ADDR": ip}).status_code


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
            .post(URL, headers={"X-Forwarded-For": chain}, environ_base={"REMOTE_ADDR": "10.0.0.1"})
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
    response = client.post(URL)
    assert response.status_code == 200
    assert upstream.last.json["user"] == f"visitor_{visitor_id}"  # not logged out
    new_cookie = client.get_cookie(COOKIE).value
    assert new_cookie != old_cookie
    assert VisitorCookie(NEW_KEY, [], 3600).verify(new_cookie) == (visitor_id, False)
    assert VisitorCookie(OLD_KEY, [], 3600).verify(new_cookie) == (None, False)
    # The re-issued cookie works and is not re-issued again.
    response = client.post(URL)
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
    assert client.post(URL).status_code == 200
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
    assert client.post(URL).status_code == 200
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
