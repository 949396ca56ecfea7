"""The fake model's CLI scripts the faults an operator rehearses against a running service: each
test starts ``python -m chatkit_flask.testing.fake_responses`` as a process and talks to it over
loopback HTTP, as the service would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from chatkit_flask.testing import chatkit_test_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "chatkit_flask.testing.fake_responses"]


@pytest.fixture
def fake_cli() -> Iterator[Callable[..., str]]:
    """Start the CLI with the given options on a free port; returns its ``/v1`` base URL."""
    processes: list[subprocess.Popen[str]] = []

    def start(*options: str) -> str:
        process = subprocess.Popen(
            [*CLI, "--port", "0", *options], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until it listens (or exits)
        found = re.search(r"listening on (http://\S+/v1)", line)
        if not found:  # its first line must say where it listens; never wait for more
            process.kill()
            raise AssertionError(line + process.stdout.read())
        return found.group(1)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class Stream:
    status: int
    events: list[dict[str, Any]] = field(default_factory=list)
    ended: str = "complete"  # or "cut" (connection closed early) or "stalled" (no data)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == kind]

    @property
    def text(self) -> str:
        return "".join(event["delta"] for event in self.of("response.output_text.delta"))


def ask(base: str, text: str = "hi", read_timeout: float = 10.0) -> Stream:
    """One streamed ``POST /v1/responses``, its events read as they arrive."""
    body = {"model": "gpt-test", "stream": True, "input": [{"role": "user", "content": text}]}
    with requests.post(
        f"{base}/responses", json=body, stream=True, timeout=(5, read_timeout)
    ) as response:
        stream = Stream(response.status_code)
        try:
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    stream.events.append(json.loads(line[6:]))
        except requests.exceptions.ChunkedEncodingError:
            stream.ended = "cut"
        except requests.exceptions.ConnectionError as error:  # the read timeout, mid-stream
            assert "timed out" in str(error), error
            stream.ended = "stalled"
    return stream


def test_help_offers_every_knob() -> None:
    result = subprocess.run([*CLI, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for option in ("--host", "--port", "--token-delay", "--reply", "--words", "--status",
                   "--retry-after", "--stall-after", "--cut-after", "--input-tokens",
                   "--output-tokens", "--call-tool", "--times"):  # fmt: skip
        assert option in result.stdout, option


def test_a_long_reply_with_scripted_usage_then_the_echo(fake_cli: Callable[..., str]) -> None:
    base = fake_cli("--words", "300", "--token-delay", "0", "--input-tokens", "1234",
                    "--output-tokens", "56", "--times", "1")  # fmt: skip
    long = ask(base)
    assert long.status == 200 and long.ended == "complete"
    assert len(long.of("response.output_text.delta")) == 300
    assert long.text.split() == [f"word{i}" for i in range(1, 301)]
    (completed,) = long.of("response.completed")
    assert completed["response"]["usage"]["input_tokens"] == 1234
    assert completed["response"]["usage"]["output_tokens"] == 56
    assert completed["response"]["usage"]["total_tokens"] == 1290

    after = ask(base, "hello there")  # --times 1: the second request is answered as usual
    assert after.text == "You said: hello there"
    assert after.of("response.completed")[0]["response"]["usage"]["output_tokens"] == 4


def test_the_delay_per_word_paces_the_stream(fake_cli: Callable[..., str]) -> None:
    base = fake_cli("--reply", "one two three four five", "--token-delay", "0.2")
    started = time.monotonic()
    stream = ask(base)
    assert stream.text == "one two three four five"
    assert time.monotonic() - started >= 5 * 0.2


@pytest.mark.parametrize(
    ("options", "status", "code", "retry_after"),
    [
        (["--status", "429", "--retry-after", "7"], 429, "rate_limit_exceeded", "7"),
        (["--status", "500"], 500, None, None),
    ],
)
def test_an_http_error(
    fake_cli: Callable[..., str],
    options: list[str],
    status: int,
    code: str | None,
    retry_after: str | None,
) -> None:
    base = fake_cli(*options)
    body = {"model": "gpt-test", "stream": True, "input": "hi"}
    response = requests.post(f"{base}/responses", json=body, timeout=5)
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_a_cut_stream_ends_without_completed(fake_cli: Callable[..., str]) -> None:
    base = fake_cli("--words", "10", "--cut-after", "3", "--token-delay", "0")
    stream = ask(base)
    assert stream.status == 200 and stream.ended == "cut"
    assert stream.text.split() == ["word1", "word2", "word3"]
    assert not stream.of("response.completed")


def test_a_stall_keeps_the_connection_silent(fake_cli: Callable[..., str]) -> None:
    base = fake_cli("--words", "10", "--stall-after", "2", "--token-delay", "0")
    started = time.monotonic()
    stream = ask(base, read_timeout=1.0)
    assert stream.ended == "stalled"
    assert time.monotonic() - started >= 1.0
    assert stream.text.split() == ["word1", "word2"]
    assert not stream.of("response.completed")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--retry-after", "5"], "--retry-after needs --status"),
        (["--cut-after", "2", "--stall-after", "2"], "not allowed with argument"),
        (["--words", "-1"], "--words must be 0 or more"),
        (["--status", "1000"], "--status must be an HTTP status code"),
        (["--call-tool", "book", "[1]"], "--call-tool book: JSON must be an object"),
        (["--call-tool", "book", "{not json"], "--call-tool book: JSON must be an object"),
        (["--call-tool", "book slot", "{}"], "--call-tool NAME must be a function name"),
        (["--call-tool", "book"], "expected 2 arguments"),
    ],
)
def test_contradictory_options_stop_it_with_a_message(options: list[str], message: str) -> None:
    result = subprocess.run([*CLI, *options], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


# ------------------------------------------------------------------ tool calls
TOOLS = [{"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}}
         for name in ("lookup", "book")]  # fmt: skip


def call(base: str, items: list[dict[str, Any]], tools: bool = True) -> Stream:
    """A model request as the Agents SDK makes it: the conversation so far, the tools offered."""
    body: dict[str, Any] = {"model": "gpt-test", "stream": True, "input": items}
    if tools:
        body["tools"] = TOOLS
    with requests.post(f"{base}/responses", json=body, stream=True, timeout=10) as response:
        stream = Stream(response.status_code)
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                stream.events.append(json.loads(line[6:]))
    return stream


def function_call(stream: Stream) -> tuple[str, dict[str, Any]]:
    """The tool the model asked for, and its arguments (the stream has no text)."""
    assert stream.status == 200 and stream.text == ""
    (done,) = stream.of("response.output_item.done")
    item = done["item"]
    assert item["type"] == "function_call" and stream.of("response.completed")
    return item["name"], json.loads(item["arguments"])


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def ran(name: str, output: str = "ok") -> list[dict[str, Any]]:
    """What the Agents SDK appends after running a tool: the call, then its output."""
    call_id = f"call_{name}"
    return [{"type": "function_call", "call_id": call_id, "name": name, "arguments": "{}"},
            {"type": "function_call_output", "call_id": call_id, "output": output}]  # fmt: skip


def test_tool_calls_then_the_answer_for_every_message(fake_cli: Callable[..., str]) -> None:
    base = fake_cli("--call-tool", "lookup", '{"day": "Monday", "size": 2}', "--call-tool", "book",
                    "{}", "--reply", "Booked.", "--token-delay", "0")  # fmt: skip
    first = [user("a table on Monday")]
    assert function_call(call(base, first)) == ("lookup", {"day": "Monday", "size": 2})
    # Another visitor's message arrives in between: it starts its own turn.
    assert function_call(call(base, [user("and me?")]))[0] == "lookup"
    assert function_call(call(base, first + ran("lookup"))) == ("book", {})
    answer = call(base, first + ran("lookup") + ran("book"))
    assert answer.text == "Booked."
    assert [done["item"]["type"] for done in answer.of("response.output_item.done")] == ["message"]
    # The next message of the same conversation: the calls again, then the answer.
    later = first + ran("lookup") + ran("book") + [{"role": "assistant", "content": "Booked."},
                                                   user("thanks")]  # fmt: skip
    assert function_call(call(base, later))[0] == "lookup"
    # A request that offers no tools (a thread title) gets the answer.
    assert call(base, [user("Title this thread")], tools=False).text == "Booked."


def test_tool_calls_for_the_first_messages_only_then_the_echo(
    fake_cli: Callable[..., str],
) -> None:
    base = fake_cli("--call-tool", "lookup", "{}", "--times", "1", "--token-delay", "0")
    assert function_call(call(base, [user("one")]))[0] == "lookup"
    assert call(base, [user("one"), *ran("lookup")]).text == "You said: one"
    assert call(base, [user("two")]).text == "You said: two"  # --times 1: one message


def test_a_fault_after_the_tool_calls(fake_cli: Callable[..., str]) -> None:
    base = fake_cli("--call-tool", "lookup", "{}", "--status", "500")
    assert function_call(call(base, [user("one")]))[0] == "lookup"
    assert call(base, [user("one"), *ran("lookup")]).status == 500


def test_a_site_runs_its_tool_against_the_cli(
    fake_cli: Callable[..., str], tmp_path: Path
) -> None:
    """The service's view: the Agents SDK calls the site's tool as the CLI scripts it, then the
    answer streams; the thread's title call (titles on) gets the answer too."""
    pytest.importorskip("chatkit_flask.server.actions")
    from agents import Agent, function_tool
    from flask import Flask

    from chatkit_flask import ChatKit
    from chatkit_flask.testing import ChatKitDriver

    seen: list[str] = []

    @function_tool
    def lookup(day: str) -> str:
        """Free slots of a day."""
        seen.append(day)
        return "10:00"

    module = types.ModuleType("fake_cli_site")
    module.agent = Agent(name="Site", model="gpt-test", tools=[lookup])  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    base = fake_cli("--call-tool", "lookup", '{"day": "Monday"}', "--reply", "10:00 is free.",
                    "--token-delay", "0")  # fmt: skip
    app = Flask("cli_site")
    app.config.update(
        chatkit_test_config(
            None,
            CHATKIT_BACKEND="server",
            OPENAI_BASE_URL=base,
            CHATKIT_STORE_URL=f"sqlite:///{tmp_path}/threads.db",
            CHATKIT_AGENT="fake_cli_site:agent",
            CHATKIT_TITLE_MODEL="",  # on: the agent's model
        )
    )
    chatkit = ChatKit(app)
    try:
        chat = ChatKitDriver(app)
        reply = chat.send("Monday?")
        assert reply.text == "10:00 is free." and seen == ["Monday"]
        assert reply.title == "10:00 is free"  # the title call got the answer too
        assert chat.send("Tuesday too?").text == "10:00 is free." and seen == ["Monday"] * 2
    finally:
        chatkit.close(app)
        del sys.modules[module.__name__]
