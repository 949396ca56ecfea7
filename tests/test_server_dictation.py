"""Dictation in server mode (``input.transcribe``): the composer's recording goes to OpenAI's
transcription endpoint (here the fake Responses API's ``/v1/audio/transcriptions``) through the
site's model client, and the text comes back for the composer.

What a site may rely on: off by default (a clear 400, no model call); when on, the recording
reaches the model as a file of its type and the transcript is answered; a recording over
``CHATKIT_TRANSCRIBE_MAX_BYTES`` is a 413 before the model (the larger request body is allowed
for dictation alone); a recording counts as a message for the message limits and its tokens
are charged to the budget, reserved before the call (a visitor over budget is refused before
any call, concurrent recordings overspend by at most one reservation) and settled with what the
provider reports (a failed call releases it); a failed transcription is a generic 502, neither
the provider's text nor the transcript in a log line.

Dictation never reads or writes the thread store, so these keep threads in SQLite.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("chatkit_flask.server.dictation")

from flask import Flask

from chatkit_flask.server.dictation import reservation_tokens
from chatkit_flask.settings import ConfigError
from chatkit_flask.testing.fake_responses import FakeResponses, Reply
from tests.conftest import REDIS_URL
from tests.test_server_metrics import Delta
from tests.test_server_mode import (
    assert_json_error,
    create_body,
    create_thread,
    make_app,  # noqa: F401  (fixture)
    post,
    sqlite_url,  # noqa: F401  (fixture)
)

MODEL = "gpt-4o-mini-transcribe"
SPOKEN = "book me a table for two"


def dictation_body(audio: bytes, mime_type: str = "audio/webm;codecs=opus") -> dict[str, Any]:
    return {
        "type": "input.transcribe",
        "params": {"audio_base64": base64.b64encode(audio).decode(), "mime_type": mime_type},
    }


def transcriptions(fake: FakeResponses) -> list[Any]:
    return [r for r in fake.requests if r.path.startswith("/v1/audio/transcriptions")]


@pytest.fixture
def dictating(make_app: Callable[..., Flask]) -> Callable[..., Flask]:  # noqa: F811
    """An app with dictation on; keyword arguments override config."""

    def factory(**overrides: Any) -> Flask:
        return make_app(**{"CHATKIT_TRANSCRIBE_MODEL": MODEL, **overrides})

    return factory


def test_dictation_is_off_by_default(
    make_app: Callable[..., Flask], fake: FakeResponses  # noqa: F811
) -> None:
    client = make_app().test_client()
    response = post(client, dictation_body(b"audio" * 10))
    body = assert_json_error(response, 400, "unsupported_request")
    assert body["message"] == "Dictation is off on this site."
    assert fake.count == 0


def test_the_recording_is_transcribed_by_the_configured_model(
    dictating: Callable[..., Flask], fake: FakeResponses, caplog: pytest.LogCaptureFixture
) -> None:
    client = dictating().test_client()
    audio = b"\x1aE\xdf\xa3" + bytes(range(256)) * 20  # a WebM header, then anything
    fake.enqueue_transcription(Reply(text=SPOKEN, input_tokens=40, output_tokens=6))
    delta = Delta()
    response = post(client, dictation_body(audio))
    assert response.status_code == 200, response.data
    assert response.mimetype == "application/json"
    assert response.get_json() == {"text": SPOKEN}
    (sent,) = transcriptions(fake)
    assert sent.json["model"] == MODEL
    assert sent.json["file"] == {"filename": "audio.webm", "size": len(audio),
                                 "content_type": "audio/webm"}
    assert sent.headers["authorization"].startswith("Bearer ")
    assert SPOKEN not in caplog.text  # the transcript is the visitor's words
    assert delta("chatkit_messages_total", outcome="completed") == 1
    assert delta("chatkit_model_tokens_total", kind="input") == 40
    assert delta("chatkit_model_tokens_total", kind="output") == 6

    for mime_type, name in (("audio/mp4", "audio.m4a"), ("audio/ogg;codecs=opus", "audio.ogg")):
        assert post(client, dictation_body(b"x" * 50, mime_type)).status_code == 200
        assert transcriptions(fake)[-1].json["file"]["filename"] == name


def test_a_recording_that_is_not_audio_we_take_is_400(
    dictating: Callable[..., Flask], fake: FakeResponses
) -> None:
    client = dictating().test_client()
    for body in (
        dictation_body(b"x" * 50, "video/webm"),
        dictation_body(b""),
        {"type": "input.transcribe", "params": {"audio_base64": "not base64!",
                                                "mime_type": "audio/webm"}},
    ):
        assert_json_error(post(client, body), 400, "invalid_request")
    assert fake.count == 0


def test_an_oversized_recording_is_413_before_the_model(
    dictating: Callable[..., Flask], fake: FakeResponses
) -> None:
    client = dictating(CHATKIT_TRANSCRIBE_MAX_BYTES=100_000).test_client()
    refused = post(client, dictation_body(b"x" * 100_001))
    body = assert_json_error(refused, 413, "audio_too_large")
    assert "0.1 MB" in body["message"]
    # Far beyond the cap: the request body itself is refused before it is parsed.
    assert_json_error(post(client, dictation_body(b"x" * 400_000)), 413, "payload_too_large")
    assert fake.count == 0
    assert post(client, dictation_body(b"x" * 100_000)).status_code == 200
    assert transcriptions(fake)[-1].json["file"]["size"] == 100_000


def test_only_dictation_may_send_a_large_body(
    dictating: Callable[..., Flask], fake: FakeResponses
) -> None:
    """The message body cap stays as it is for every other type while dictation is on."""
    client = dictating(CHATKIT_MAX_INPUT_CHARS=100).test_client()
    padded = {**create_body("hi"), "metadata": {"pad": "x" * 80_000}}
    assert_json_error(post(client, padded), 413, "payload_too_large")
    assert post(client, dictation_body(b"x" * 80_000)).status_code == 200
    assert fake.count == 1


def test_a_recording_counts_as_a_message(
    dictating: Callable[..., Flask], fake: FakeResponses
) -> None:
    app = dictating(CHATKIT_RATELIMIT_PER_USER="3 per minute", CHATKIT_RATELIMIT_PER_IP="off")
    client = app.test_client()
    assert post(client, dictation_body(b"x" * 50)).status_code == 200
    assert post(client, dictation_body(b"x" * 50)).status_code == 200
    create_thread(client, "and a message")  # the third message
    count = fake.count
    refused = post(client, dictation_body(b"x" * 50))
    body = assert_json_error(refused, 429, "rate_limited")
    assert body["scope"] == "user" and int(refused.headers["Retry-After"]) >= 1
    assert fake.count == count
    assert post(app.test_client(), dictation_body(b"x" * 50)).status_code == 200  # others may


def test_a_recordings_tokens_are_charged_to_the_budget_which_then_refuses_it(
    dictating: Callable[..., Flask], fake: FakeResponses
) -> None:
    client = dictating(CHATKIT_TOKENS_PER_USER="100 per day").test_client()
    fake.enqueue_transcription(Reply(text=SPOKEN, input_tokens=150))
    assert post(client, dictation_body(b"x" * 50)).status_code == 200
    time.sleep(0.3)  # charged off the event loop, once the answer is out
    count = fake.count
    refused = post(client, dictation_body(b"x" * 50))
    body = assert_json_error(refused, 429, "token_budget")
    assert "share of the assistant" in body["message"]
    assert fake.count == count


# ------------------------------------------------- the budget: reserve, then settle
TEN_SECONDS = b"x" * 40_000  # the longest it can last: 10 s at 32 kbit/s
RESERVED = reservation_tokens(len(TEN_SECONDS))


def test_the_reservation_is_the_documented_estimate() -> None:
    assert RESERVED == 20 + 10 * 20  # the request, then 20 tokens a second
    assert reservation_tokens(3_000_000) == 15_020  # the default cap (README)


@pytest.fixture
def budgeted(
    dictating: Callable[..., Flask], real_redis: Any
) -> Callable[..., Flask]:
    """Dictation with token budgets counted in the suite's Redis (``counted`` reads them)."""

    def factory(**overrides: Any) -> Flask:
        return dictating(RATELIMIT_STORAGE_URI=REDIS_URL, CHATKIT_RATELIMIT_PER_USER="off",
                         CHATKIT_RATELIMIT_PER_IP="off", **overrides)  # fmt: skip

    return factory


def counted(redis: Any) -> list[int]:
    """Every token-budget counter in the limiter's Redis."""
    return [int(redis.get(key) or 0) for key in redis.scan_iter("*/tokens/*")]


def settled(redis: Any, expected: list[int]) -> list[int]:
    """The settle runs off the event loop after the answer: poll for it."""
    deadline = time.monotonic() + 5
    while (now := counted(redis)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def in_flight(client: Any, fake: FakeResponses, body: dict[str, Any]) -> Any:
    """Send ``body`` on a thread; return its future once the fake has the request."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(post, client, body)
    pool.shutdown(wait=False)
    deadline = time.monotonic() + 5
    while not transcriptions(fake):
        assert time.monotonic() < deadline and not future.done(), "no transcription call"
        time.sleep(0.01)
    return future


def test_a_recording_reserves_its_worst_case_then_is_charged_what_the_provider_reports(
    budgeted: Callable[..., Flask], fake: FakeResponses, real_redis: Any
) -> None:
    client = budgeted(CHATKIT_TOKENS_PER_USER="100000 per day").test_client()
    fake.enqueue_transcription(
        Reply(text=SPOKEN, input_tokens=150, output_tokens=6, token_delay=0.5)
    )
    future = in_flight(client, fake, dictation_body(TEN_SECONDS))
    assert counted(real_redis) == [RESERVED]  # set aside before the call
    assert future.result().status_code == 200
    assert settled(real_redis, [156]) == [156]  # then what the provider reported, exactly


def test_a_failed_transcription_releases_its_reservation(
    budgeted: Callable[..., Flask], fake: FakeResponses, real_redis: Any
) -> None:
    client = budgeted(CHATKIT_TOKENS_PER_USER="100000 per day").test_client()
    fake.enqueue_transcription(dataclasses.replace(Reply.error(500), token_delay=0.5))
    future = in_flight(client, fake, dictation_body(TEN_SECONDS))
    assert counted(real_redis) == [RESERVED]
    assert_json_error(future.result(), 502, "transcription_failed")
    assert settled(real_redis, [0]) == [0]  # nothing charged, nothing held


def test_a_visitor_over_budget_is_refused_before_the_call_as_a_message_is(
    budgeted: Callable[..., Flask],
    fake: FakeResponses,
    real_redis: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = budgeted(CHATKIT_TOKENS_PER_USER="100 per day")
    client = app.test_client()
    fake.enqueue_transcription(Reply(text=SPOKEN, input_tokens=150))
    assert post(client, dictation_body(b"x" * 50)).status_code == 200
    assert settled(real_redis, [150 + 6]) == [156]  # the budget is spent
    fake.clear()
    # The view's look before any work refuses it...
    looked = assert_json_error(post(client, dictation_body(b"x" * 50)), 429, "token_budget")
    # ...and so does the reservation, for a request that looked before another's charge landed.
    monkeypatch.setattr(app.extensions["chatkit"].server.budget, "exceeded", lambda owner: None)
    refused = post(client, dictation_body(b"x" * 50))
    reserved = assert_json_error(refused, 429, "token_budget")
    assert fake.count == 0  # neither reached the model
    assert set(reserved) == set(looked) == {"error", "message", "retry_after", "scope",
                                            "request_id"}  # fmt: skip
    assert reserved["scope"] == looked["scope"] == "tokens"
    assert reserved["message"].startswith("You have used up your share of the assistant")
    assert reserved["message"].split(". Try")[0] == looked["message"].split(". Try")[0]
    assert int(refused.headers["Retry-After"]) == reserved["retry_after"] >= 1
    # A message over the same budget says the same words (in its stream).
    message = post(client, create_body("and now a message"))
    assert reserved["message"].split(". Try")[0] in message.get_data(as_text=True)


def test_concurrent_recordings_overspend_the_budget_by_at_most_one_reservation(
    budgeted: Callable[..., Flask], fake: FakeResponses, real_redis: Any
) -> None:
    """Before: each recording was charged after its call, so ten at once all passed the look
    before any was charged (1,560 tokens against 500)."""
    app = budgeted(CHATKIT_TOKENS_PER_USER="500 per day")
    first = app.test_client()
    first.get("/api/chatkit/config")
    cookie = first.get_cookie("chatkit_session_id").value
    fake.enqueue_transcription(
        *[Reply(text=SPOKEN, input_tokens=150, output_tokens=6, token_delay=1.0)] * 10
    )

    def one(_: int) -> Any:
        client = app.test_client()
        client.set_cookie("chatkit_session_id", cookie)
        return post(client, dictation_body(TEN_SECONDS))

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(one, range(10)))
    answered = [r for r in responses if r.status_code == 200]
    for refused in (r for r in responses if r.status_code != 200):
        assert assert_json_error(refused, 429, "token_budget")["scope"] == "tokens"
    assert 1 <= len(answered) < 10
    assert len(transcriptions(fake)) == len(answered)  # a refused one never reached the model
    billed = 156 * len(answered)
    assert billed <= 500 + RESERVED
    assert settled(real_redis, [billed]) == [billed]


def test_a_failed_transcription_is_a_generic_502(
    dictating: Callable[..., Flask], fake: FakeResponses, caplog: pytest.LogCaptureFixture
) -> None:
    client = dictating().test_client()
    fake.enqueue_transcription(Reply.error(500, "upstream-detail-that-must-stay-private"))
    delta = Delta()
    response = post(client, dictation_body(b"x" * 50))
    body = assert_json_error(response, 502, "transcription_failed")
    assert "upstream-detail" not in json.dumps(body) and "upstream-detail" not in caplog.text
    assert "transcription failed: InternalServerError status=500" in caplog.text
    assert delta("chatkit_messages_total", outcome="failed") == 1
    assert delta("chatkit_model_errors_total") == 1
    assert post(client, dictation_body(b"x" * 50)).status_code == 200  # the next one works


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"CHATKIT_TRANSCRIBE_MODEL": "gpt 4o transcribe"}, "CHATKIT_TRANSCRIBE_MODEL"),
        ({"CHATKIT_TRANSCRIBE_MAX_BYTES": "10"}, "CHATKIT_TRANSCRIBE_MAX_BYTES"),
        ({"CHATKIT_TRANSCRIBE_MAX_BYTES": "3 MB"}, "CHATKIT_TRANSCRIBE_MAX_BYTES"),
        ({"CHATKIT_TRANSCRIBE_MAX_BYTES": "30000000"}, "CHATKIT_TRANSCRIBE_MAX_BYTES"),
    ],
)
def test_a_bad_dictation_setting_stops_start_up_naming_the_key(
    make_app: Callable[..., Flask], overrides: dict[str, str], key: str  # noqa: F811
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_app(**overrides)
    assert caught.value.key == key
