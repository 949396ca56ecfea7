"""A private ``redis-server`` for tests and benchmarks: its own port, its own temporary directory,
no persistence, stopped (and its directory removed) when done.

Tests and the bench use this instead of a Redis somebody else runs, so a test run never flushes a
developer's data::

    with RedisServer() as server:
        url = server.url(15)

The binary comes from the system (Debian package ``redis-server``); :class:`RedisServerMissing`
says so when it is not installed. :meth:`RedisServer.start` checks that the server answering on
the port is the process it started (``INFO server`` ``process_id``), so a server that happens to
hold the port is never mistaken for ours.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

__all__ = ["REDIS_PACKAGE", "RedisServer", "RedisServerMissing", "free_port"]

REDIS_PACKAGE = "redis-server"  # the Debian package that ships the binary
# Below Linux's ephemeral range (32768-60999): ports handed out by bind(("", 0)) and outgoing
# connections never land here, so a port chosen early stays free until the server binds it.
_PORT_RANGE = (20000, 32767)


class RedisServerMissing(RuntimeError):
    """The ``redis-server`` binary is not on PATH."""

    def __init__(self, binary: str = "redis-server") -> None:
        super().__init__(
            f"{binary} not found: install the Debian package {REDIS_PACKAGE} "
            f"(apt-get install {REDIS_PACKAGE}; .ci/run does it)"
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on, outside the ephemeral range (see ``_PORT_RANGE``)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(*_PORT_RANGE)
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {_PORT_RANGE[0]}-{_PORT_RANGE[1]} on {host}")


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port`` that this object started.

    ``port=None`` picks a free one now, so :meth:`url` is known before :meth:`start`. The
    server may be killed and started again on the same port (fault tests), or paused.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        directory: str | Path | None = None,
        binary: str = "redis-server",
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.binary = binary
        self._own_directory = directory is None
        self.directory = Path(directory) if directory is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def client(self, db: int = 0, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, db=db, socket_timeout=timeout)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> None:
        """Start the process and return once it answers PING as itself."""
        if self.process is not None:
            raise RuntimeError("this redis-server is already running")
        executable = shutil.which(self.binary)
        if executable is None:
            raise RedisServerMissing(self.binary)
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="chatkit-redis-"))
        log = self.directory / "redis.log"
        # Persistence off and nothing written but the log: a test server holds nothing worth
        # keeping, and a dump would be read back by the next start on the same directory.
        self.process = subprocess.Popen(  # noqa: S603 (our own arguments, the binary from PATH)
            [executable, "--port", str(self.port), "--bind", self.host,
             "--dir", str(self.directory), "--logfile", str(log),
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = self.client(timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break  # exited: port taken, bad option...
                try:
                    answering = client.info("server").get("process_id")
                except redis.RedisError:
                    time.sleep(0.05)
                    continue
                if answering == self.process.pid:
                    return
                break  # another server holds the port: never use it
        finally:
            client.close()
        tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
        self._end(signal.SIGKILL)
        self.stop()  # removes the directory it made
        raise RuntimeError(f"redis-server did not start on {self.host}:{self.port}: {tail}")

    def stop(self) -> None:
        """Terminate the process and remove the directory this object created."""
        if self.process is not None:
            self.resume()
            self._end(signal.SIGTERM)
        if self._own_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def kill(self) -> None:
        """SIGKILL, keeping the port and directory for a later :meth:`start` (a crash)."""
        assert self.process is not None, "not running"
        self._end(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered (a hang)."""
        assert self.process is not None, "not running"
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def _end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
