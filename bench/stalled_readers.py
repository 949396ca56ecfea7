"""Memory held by clients that stop reading (issue 22 item 1).

One gunicorn worker (the shipped config, server mode, a SQLite store, limits in a private
Redis); N clients each take the first bytes of a long reply and stop reading. The worker's RSS
is sampled for a minute: the peak growth per stalled stream is what one such client costs
before ``CHATKIT_STREAM_WRITE_TIMEOUT`` drops it.

    .venv/bin/python bench/stalled_readers.py --streams 20 --delay 0.002 --pad 0

``--delay`` is the fake model's seconds per word, ``--pad`` adds characters to each word (a
model that streams more bytes per delta). Prints one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatkit_flask.testing.fake_responses import FakeResponses, Reply  # noqa: E402
from chatkit_flask.testing.redis_server import RedisServer, free_port  # noqa: E402

KEY = "bench-model-key"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def message(text: str) -> dict:
    content = [{"type": "input_text", "text": text}]
    return {"type": "threads.create",
            "params": {"input": {"content": content, "attachments": [], "inference_options": {}}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.002)
    parser.add_argument("--pad", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()

    with FakeResponses(api_key=KEY) as fake, RedisServer() as limits, \
            tempfile.TemporaryDirectory() as tmp:  # fmt: skip
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATKIT_", "GUNICORN_"))}
        env.update(
            CHATKIT_BACKEND="server", OPENAI_API_KEY=KEY, OPENAI_BASE_URL=fake.base_url,
            OPENAI_AGENTS_DISABLE_TRACING="1", SECRET_KEY="bench-" * 8,
            CHATKIT_COOKIE_SECURE="false", CHATKIT_STORE_URL=f"sqlite:///{tmp}/threads.db",
            RATELIMIT_STORAGE_URI=limits.url(0), CHATKIT_MAX_STREAMS_PER_IP="1000",
            CHATKIT_RATELIMIT_PER_IP="10000 per minute",
            CHATKIT_RATELIMIT_REQUESTS_PER_IP="10000 per minute",
            GUNICORN_BIND=f"127.0.0.1:{port}", GUNICORN_WORKERS="1",
        )  # fmt: skip
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if requests.get(base + "/healthz", timeout=1).ok:
                        break
                except requests.RequestException:
                    time.sleep(0.1)
            children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text()
            worker = int(children.split()[0])
            for _ in range(5):  # warm: imports, clients, the store
                requests.post(base + "/api/chatkit", json=message("hi"), timeout=30)
            time.sleep(1)
            before = rss_mb(worker)
            words = " ".join(f"word{i}" + "x" * args.pad for i in range(100_000))
            for _ in range(args.streams):
                fake.enqueue(Reply(text=words, token_delay=args.delay))
            body = json.dumps(message("long"))
            clients = []
            for _ in range(args.streams):
                client = socket.socket()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.connect(("127.0.0.1", port))
                client.sendall(
                    f"POST /api/chatkit HTTP/1.1\r\nHost: bench\r\nContent-Type: "
                    f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
                )
                client.recv(512)  # the headers and the first frame, then never again
                clients.append(client)
            peak, started = before, time.monotonic()
            while time.monotonic() - started < args.seconds:
                peak = max(peak, rss_mb(worker))
                time.sleep(0.5)
            growth = (peak - before) / args.streams
            print(f"RESULT streams={args.streams} delay={args.delay} pad={args.pad} "
                  f"rss_before_mb={before:.1f} rss_peak_mb={peak:.1f} "
                  f"per_stalled_stream_mb={growth:.2f}")  # fmt: skip
            for client in clients:
                client.close()
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
