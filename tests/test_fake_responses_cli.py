"""The fake model's CLI scripts the faults an operator rehearses against a running service: each
test starts ``python -m chatkit_flask.testing.fake_responses`` as a process and talks to it over
loopback HTTP, as the service would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

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
        assert found, line + process.stdout.read()
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
                   "--output-tokens", "--times"):  # fmt: skip
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
    ],
)
def test_contradictory_options_stop_it_with_a_message(options: list[str], message: str) -> None:
    result = subprocess.run([*CLI, *options], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
