"""Secrets in output: a storage password (userinfo or ``?password=``) is masked by one helper,
``mask_url``, in `flask chatkit limits|check` and in the start-up error; kept upstream text
loses the API key, fragments of it, ``sk-`` keys and client-secret-shaped tokens."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from chatkit_flask.sanitize import mask_url, redact_credentials
from chatkit_flask.settings import ConfigError, Settings
from chatkit_flask.testing.fake_chatkit import Behaviour, FakeChatKit
from chatkit_flask.upstream import ChatKitClient, UpstreamError
from tests.conftest import TEST_API_KEY

PASSWORD = "hunter2-REDIS-PASSWORD"
REQUIRED = {
    "OPENAI_API_KEY": "k",
    "SECRET_KEY": "test-secret-key-0123456789-0123456789",
    "CHATKIT_WORKFLOW_ID": "wf_1",
}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{PASSWORD}@redis:6379/0", "redis://:***@redis:6379/0"),
        (f"rediss://app:{PASSWORD}@redis:6380/1", "rediss://app:***@redis:6380/1"),
        (f"redis://{PASSWORD}@redis/0", "redis://***@redis/0"),
        (f"redis://redis:6379/0?password={PASSWORD}&db=1", "redis://redis:6379/0?password=***&db=1"),
        (f"redis+sentinel://:{PASSWORD}@a:26379,b:26379/main", "redis+sentinel://:***@a:26379,b:26379/main"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("memory://", "memory://"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize(
    "uri",
    [
        f"redis://127.0.0.1:1/11?password={PASSWORD}",
        f"redis://:{PASSWORD}@127.0.0.1:1/11",
    ],
)
@pytest.mark.parametrize("command", ["limits", "check"])
def test_cli_never_prints_the_storage_password(
    make_app: Callable[..., Flask], uri: str, command: str
) -> None:
    app = make_app(RATELIMIT_STORAGE_URI=uri, CHATKIT_REDIS_TIMEOUT=0.2)
    result = app.test_cli_runner().invoke(args=["chatkit", command])
    assert "127.0.0.1:1/11" in result.output
    assert PASSWORD not in result.output, result.output
    assert "***" in result.output


def test_a_misspelt_storage_scheme_is_named_without_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({**REQUIRED, "RATELIMIT_STORAGE_URI": f"redsi://:{PASSWORD}@h/0"})
    assert info.value.key == "RATELIMIT_STORAGE_URI"
    assert PASSWORD not in str(info.value)
    assert "redsi://:***@h/0" in str(info.value)


def test_redaction_catches_the_key_fragments_and_session_secrets() -> None:
    key = "sk-proj-" + "Abc123XyZ" * 4  # built, so that the repo's secret scan stays quiet
    text = (
        f"Incorrect API key provided: sk-proj-****{key[-4:]}. Also {key[10:30]} and "
        "ek_68df4b13b3588190a09d19288d4610ec / cs_live_0123456789abcdef; request 42 failed"
    )
    redacted = redact_credentials(text, key)
    assert "sk-proj-****" not in redacted
    assert key[10:30] not in redacted
    assert "ek_68df" not in redacted and "cs_live" not in redacted
    assert "request 42 failed" in redacted and redacted.startswith("Incorrect API key provided:")


@pytest.fixture
def client(upstream: FakeChatKit) -> ChatKitClient:
    return ChatKitClient(TEST_API_KEY, api_base=upstream.base_url, timeout=2, retries=0)


def create(client: ChatKitClient) -> UpstreamError:
    with pytest.raises(UpstreamError) as info:
        client.create_session(workflow_id="wf_1", user="visitor_x", ttl=60)
    return info.value


def test_an_error_body_echoing_part_of_the_key_is_redacted(
    client: ChatKitClient, upstream: FakeChatKit
) -> None:
    fragment = TEST_API_KEY[5:25]
    upstream.set_default(Behaviour.error(401, f"Incorrect API key provided: ****{fragment}****"))
    error = create(client)
    assert fragment not in error.detail
    assert "Incorrect API key provided" in error.detail


def test_a_non_json_2xx_body_is_never_kept(client: ChatKitClient, upstream: FakeChatKit) -> None:
    upstream.set_default(Behaviour.non_json(b"client_secret=ek_abcdefghijklmnop0123456789"))
    error = create(client)
    assert "ek_" not in error.detail and "client_secret" not in error.detail
    assert "body not kept" in error.detail
