"""The fake Responses API speaks what the real openai client and the Agents SDK expect."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("agents")

from agents import Agent, RunConfig, Runner, function_tool, set_tracing_disabled
from agents.models.openai_provider import OpenAIProvider
from openai import APIConnectionError, AsyncOpenAI, AuthenticationError, RateLimitError

from chatkit_flask.testing.fake_responses import FakeResponses, Reply, Turn

KEY = "test-model-key-not-a-real-one"
set_tracing_disabled(True)


@pytest.fixture
def fake() -> Iterator[FakeResponses]:
    with FakeResponses(api_key=KEY) as server:
        yield server


def raw_stream(fake: FakeResponses, body: dict[str, Any]) -> list[dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    conn.request("POST", "/v1/responses", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/event-stream")
    text = response.read().decode()
    conn.close()
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_stream_event_order_ids_and_usage(fake: FakeResponses) -> None:
    fake.token_delay = 0.001
    events = raw_stream(fake, {"model": "m", "stream": True, "instructions": "be brief",
                               "input": [{"role": "user", "content": "hello big world"}]})
    kinds = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert "".join(deltas) == "You said: hello big world" and len(deltas) == 5
    item_id = events[2]["item"]["id"]
    assert item_id.startswith("msg_") and events[-2]["item"]["id"] == item_id
    usage = events[-1]["response"]["usage"]
    assert usage == {**usage, "input_tokens": 5, "output_tokens": 5, "total_tokens": 10}
    again = raw_stream(fake, {"model": "m", "stream": True, "input": "x"})
    assert again[2]["item"]["id"] != item_id  # ids are unique per answer
    assert fake.requests[0].json["instructions"] == "be brief"
    assert fake.completed == 2


def test_real_agents_sdk_streams_a_scripted_reply(fake: FakeResponses) -> None:
    fake.enqueue("Scripted answer.")

    async def run() -> Any:
        async with AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0) as client:
            provider = OpenAIProvider(openai_client=client, use_responses=True)
            result = Runner.run_streamed(
                Agent(name="A", model="m"), "hi", run_config=RunConfig(model_provider=provider)
            )
            async for _ in result.stream_events():
                pass
            return result

    result = asyncio.run(run())
    assert result.final_output == "Scripted answer."
    assert result.context_wrapper.usage.output_tokens == 2


def run_agent(fake: FakeResponses, agent: Agent[Any], *texts: str) -> list[Any]:
    """Each text through the real Agents SDK, all at once; their final outputs."""

    async def one(text: str) -> Any:
        async with AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0) as client:
            provider = OpenAIProvider(openai_client=client, use_responses=True)
            result = Runner.run_streamed(agent, text, run_config=RunConfig(model_provider=provider))
            async for _ in result.stream_events():
                pass
            return result.final_output

    async def every() -> list[Any]:
        return list(await asyncio.gather(*(one(text) for text in texts)))

    return asyncio.run(every())


def test_a_turn_calls_its_tools_then_answers_each_conversation_at_once(
    fake: FakeResponses,
) -> None:
    ran: list[tuple[str, str]] = []

    @function_tool
    async def lookup(day: str) -> str:
        """Free slots."""
        ran.append(("lookup", day))
        await asyncio.sleep(0.05)  # the other conversation's requests arrive meanwhile
        return "10:00"

    @function_tool
    def book(slot: str) -> str:
        """Book a slot."""
        ran.append(("book", slot))
        return "booked"

    agent = Agent(name="A", model="m", tools=[lookup, book])
    fake.token_delay = 0.01
    fake.set_default(Turn.of(("lookup", {"day": "Mon"}), ("book", {"slot": "10:00"}),
                             reply="Booked."))  # fmt: skip
    assert run_agent(fake, agent, "one", "two") == ["Booked.", "Booked."]
    assert sorted(ran) == [("book", "10:00")] * 2 + [("lookup", "Mon")] * 2
    assert len(fake.requests) == 6


def test_a_queued_turn_answers_one_message_and_a_title_call_does_not_use_it_up(
    fake: FakeResponses,
) -> None:
    @function_tool
    def lookup(day: str) -> str:
        """Free slots."""
        return "10:00"

    agent = Agent(name="A", model="m", tools=[lookup])
    fake.enqueue(Turn.of(("lookup", {"day": "Tue"}), reply="Queued."))
    no_tools = raw_stream(fake, {"model": "m", "stream": True, "input": "Title this"})
    assert "".join(e["delta"] for e in no_tools if "delta" in e) == "Queued."
    assert fake.pending == 1
    assert run_agent(fake, agent, "first") == ["Queued."]
    assert fake.pending == 0
    assert run_agent(fake, agent, "second") == ["You said: second"]


@pytest.mark.parametrize(
    ("reply", "error"),
    [(Reply.rate_limited(), RateLimitError), (Reply.broken(1), APIConnectionError)],
)
def test_scripted_failures(fake: FakeResponses, reply: Reply, error: type[Exception]) -> None:
    fake.enqueue(reply)

    async def run() -> None:
        async with AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0) as client:
            stream = await client.responses.create(model="m", input="a b c", stream=True)
            async for _ in stream:
                pass

    with pytest.raises(error):
        asyncio.run(run())


def test_wrong_key_is_401(fake: FakeResponses) -> None:
    async def run() -> None:
        async with AsyncOpenAI(api_key="wrong", base_url=fake.base_url, max_retries=0) as client:
            await client.responses.create(model="m", input="hi")

    with pytest.raises(AuthenticationError):
        asyncio.run(run())


@pytest.mark.parametrize("reply", [Reply(), Reply.hang(after_tokens=2)], ids=["slow", "hang"])
def test_a_client_hanging_up_is_recorded(fake: FakeResponses, reply: Reply) -> None:
    fake.token_delay = 0.05
    fake.enqueue(reply)
    sock = socket.create_connection(("127.0.0.1", fake.port))
    body = json.dumps({"model": "m", "stream": True, "input": "one two three four five six"})
    sock.sendall(f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    received = b""
    while received.count(b"event: response.output_text.delta") < 2:
        received += sock.recv(65536)
    closed = time.monotonic()
    sock.close()
    (abort,) = fake.wait_for_abort(1, timeout=2)
    assert abort.at - closed < 1.0 and abort.tokens_sent >= 2
    assert fake.completed == 0


def test_cli_serves_until_terminated() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatkit_flask.testing.fake_responses", "--port", str(port),
         "--token-delay", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert f"127.0.0.1:{port}/v1" in proc.stdout.readline()
        fake = FakeResponses(port=port)
        fake._port = port  # talk to the CLI's server through the helper
        events = raw_stream(fake, {"model": "m", "stream": True, "input": "ping"})
        assert events[-1]["type"] == "response.completed"
    finally:
        proc.terminate()
        assert proc.wait(5) == 0


def test_transcriptions_answer_the_openai_client_with_the_scripted_text(
    fake: FakeResponses,
) -> None:
    """Dictation's endpoint: the real client's multipart upload is read, recorded and answered
    (a default naming the size, or the scripted text and usage); a scripted error is raised
    as the client's own error; a wrong key is refused like the real API."""

    async def talk() -> list[Any]:
        client = AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0)
        wrong = AsyncOpenAI(api_key="sk-wrong", base_url=fake.base_url, max_retries=0)
        audio = ("audio.webm", b"x" * 1234, "audio/webm")
        model = "gpt-4o-mini-transcribe"
        fake.enqueue_transcription(Reply(text="hello there", input_tokens=7))
        results: list[Any] = [
            await client.audio.transcriptions.create(model=model, file=audio),
            await client.audio.transcriptions.create(model=model, file=audio),
        ]
        fake.enqueue_transcription(Reply.rate_limited())
        for who in (client, wrong):
            try:
                await who.audio.transcriptions.create(model=model, file=audio)
            except (RateLimitError, AuthenticationError) as exc:
                results.append(type(exc))
        await client.close()
        await wrong.close()
        return results

    scripted, default, limited, refused = asyncio.run(talk())
    assert scripted.text == "hello there"
    assert (scripted.usage.type, scripted.usage.input_tokens, scripted.usage.output_tokens) == (
        "tokens", 7, 2)
    assert default.text == "Transcribed 1234 bytes of audio."
    assert default.usage.input_tokens == 12  # one per 100 bytes
    assert (limited, refused) == (RateLimitError, AuthenticationError)
    sent = fake.requests[0]
    assert sent.path == "/v1/audio/transcriptions"
    assert sent.json == {"model": "gpt-4o-mini-transcribe",
                         "file": {"filename": "audio.webm", "size": 1234,
                                  "content_type": "audio/webm"}}
