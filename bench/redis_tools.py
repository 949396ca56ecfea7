"""The benches' Redis: a private ``redis-server`` (or one the user names), ``redis-cli`` calls,
and a MONITOR reader that counts the round trips a request makes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatkit_flask.testing.redis_server import RedisServer, RedisServerMissing  # noqa: E402


def redis_cmd(port: int, *args: str, db: int | None = None) -> str:
    cmd = ["redis-cli", "-p", str(port)]
    if db is not None:
        cmd += ["-n", str(db)]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()


def bench_redis(port: int | None) -> RedisServer | None:
    """The bench's Redis: a private ``redis-server`` on a free port (returned, for the caller to
    stop), or with ``--redis-port`` a server the user runs, which must answer (None)."""
    if shutil.which("redis-cli") is None:
        raise SystemExit(str(RedisServerMissing("redis-cli")))
    if port is not None:
        if redis_cmd(port, "ping") != "PONG":
            raise SystemExit(f"no Redis answers on 127.0.0.1:{port} (--redis-port)")
        return None
    server = RedisServer()
    try:
        server.start()
    except RedisServerMissing as missing:
        raise SystemExit(str(missing)) from None
    return server


def redis_pid(port: int) -> int | None:
    for line in redis_cmd(port, "info", "server").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


class Monitor:
    """Counts the commands clients send to one Redis db (MONITOR); Lua-internal ones excluded."""

    def __init__(self, port: int, db: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.sendall(b"MONITOR\r\n")
        self._tag = f"[{db} 127.0.0.1:"
        self._buf = b""
        self.commands: Counter[str] = Counter()
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\r\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if self._tag in line:
                    command = line.split("] ", 1)[1].split(" ", 1)[0].strip('"').upper()
                    self.commands[command] += 1

    def close(self) -> Counter[str]:
        time.sleep(0.3)  # let the last lines arrive
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        return self.commands
