"""The upstream's body is bounded: the deadline covers it (a drip-feed ends at the deadline),
bodies over 64 KiB are refused without being read, compressed answers are refused, and any
body (deeply nested JSON included) maps to an upstream error, never a 500."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flask import Flask

from chatkit_flask.testing.fake_chatkit import Behaviour, FakeChatKit
from chatkit_flask.upstream import (
    MAX_BODY_BYTES,
    ChatKitClient,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tests.conftest import TEST_API_KEY

URL = "/api/chatkit/secret"
MIB = 1024 * 1024


@pytest.fixture
def client(upstream: FakeChatKit) -> ChatKitClient:
    return ChatKitClient(TEST_API_KEY, api_base=upstream.base_url, timeout=1.0, retries=0)


def create(client: ChatKitClient) -> tuple[UpstreamError, float]:
    started = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        client.create_session(workflow_id="wf_1", user="visitor_x", ttl=60)
    return info.value, time.monotonic() - started


def test_a_drip_fed_body_ends_at_the_deadline(client: ChatKitClient, upstream: FakeChatKit) -> None:
    upstream.set_default(Behaviour.slow_drip(interval=0.2))  # ~90 bytes: 18 s if waited for
    error, seconds = create(client)
    assert isinstance(error, UpstreamTimeout)
    assert 0.9 < seconds < 1.3, seconds


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        (Behaviour.huge(300 * MIB), "over 65536"),
        (Behaviour.huge(300 * MIB, status=500), "failed (500)"),
        (Behaviour.non_json(b" " * (MAX_BODY_BYTES + 1)), "over 65536"),
        (Behaviour.gzip_bomb(64 * MIB), "Content-Encoding 'gzip'"),
        (Behaviour.deep_json(30_000), "not JSON"),
    ],
    ids=["300MiB-200", "300MiB-500", "64KiB+1", "gzip-bomb", "deep-json"],
)
def test_oversized_compressed_or_hostile_bodies_are_upstream_errors(
    client: ChatKitClient, upstream: FakeChatKit, behaviour: Behaviour, reason: str
) -> None:
    upstream.set_default(behaviour)
    error, seconds = create(client)
    assert isinstance(error, UpstreamUnavailable)
    assert reason in str(error)
    assert seconds < 0.5, seconds  # refused, not read: 300 MiB would take seconds
    assert len(error.detail) <= 500


def test_a_normal_session_still_reuses_the_connection(
    client: ChatKitClient, upstream: FakeChatKit
) -> None:
    for _ in range(3):
        client.create_session(workflow_id="wf_1", user="visitor_x", ttl=60)
    assert upstream.connections == 1
    assert upstream.last is not None and upstream.last.headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        (Behaviour.slow_drip(interval=0.2), 504, "upstream_timeout"),
        (Behaviour.huge(300 * MIB), 502, "upstream_error"),
        (Behaviour.gzip_bomb(64 * MIB), 502, "upstream_error"),
        (Behaviour.deep_json(30_000), 502, "upstream_error"),
    ],
    ids=["drip", "huge", "gzip-bomb", "deep-json"],
)
def test_the_endpoint_maps_every_body_to_an_upstream_error(
    make_app: Callable[..., Flask],
    upstream: FakeChatKit,
    behaviour: Behaviour,
    status: int,
    code: str,
) -> None:
    upstream.set_default(behaviour)
    app = make_app(CHATKIT_UPSTREAM_TIMEOUT=1, CHATKIT_UPSTREAM_RETRIES=0)
    response = app.test_client().post(URL, json={})
    assert response.status_code == status
    assert response.get_json()["error"] == code
