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

from agents import Agent, RunConfig, Runner, set_tracing_disabled
from agents.models.openai_provider import OpenAIProvider
from openai import APIConnectionError, AsyncOpenAI, AuthenticationError, RateLimitError

from chatkit_flask.testing.fake_responses import FakeResponses, Reply

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
        client = AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0)
        config = RunConfig(model_provider=OpenAIProvider(openai_client=client, use_responses=True))
        result = Runner.run_streamed(Agent(name="A", model="m"), "hi", run_config=config)
        async for _ in result.stream_events():
            pass
        return result

    result = asyncio.run(run())
    assert result.final_output == "Scripted answer."
    assert result.context_wrapper.usage.output_tokens == 2


@pytest.mark.parametrize(
    ("reply", "error"),
    [(Reply.rate_limited(), RateLimitError), (Reply.broken(1), APIConnectionError)],
)
def test_scripted_failures(fake: FakeResponses, reply: Reply, error: type[Exception]) -> None:
    fake.enqueue(reply)

    async def run() -> None:
        client = AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0)
        stream = await client.responses.create(model="m", input="a b c", stream=True)
        async for _ in stream:
            pass

    with pytest.raises(error):
        asyncio.run(run())


def test_wrong_key_is_401(fake: FakeResponses) -> None:
    async def run() -> None:
        client = AsyncOpenAI(api_key="wrong", base_url=fake.base_url, max_retries=0)
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
