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
import shutil
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

import redis

from chatkit_flask.testing.server_process import ServerProcess, free_port

__all__ = ["REDIS_PACKAGE", "RedisServer", "RedisServerMissing", "free_port"]

REDIS_PACKAGE = "redis-server"  # the Debian package that ships the binary


class RedisServerMissing(RuntimeError):
    """The ``redis-server`` binary is not on PATH."""

    def __init__(self, binary: str = "redis-server") -> None:
        super().__init__(
            f"{binary} not found: install the Debian package {REDIS_PACKAGE} "
            f"(apt-get install {REDIS_PACKAGE}; .ci/run does it)"
        )


class RedisServer(ServerProcess):
    """One ``redis-server`` process on ``127.0.0.1:port`` that this object started.

    ``port=None`` picks a free one now, so :meth:`url` is known before :meth:`start`. The
    server may be killed and started again on the same port (fault tests), or paused.
    """

    name = "redis-server"
    log_name = "redis.log"
    poll_interval: ClassVar[float] = 0.05
    start_timeout: ClassVar[float] = 10.0

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        directory: str | Path | None = None,
        binary: str = "redis-server",
    ) -> None:
        super().__init__(port, host=host, directory=Path(directory) if directory else None)
        self.binary = binary
        self._executable: str | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def client(self, db: int = 0, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, db=db, socket_timeout=timeout)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered (a hang)."""
        assert self.process is not None, "not running"
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    # -- ServerProcess --------------------------------------------------------------------------

    def _locate(self) -> None:
        self._executable = shutil.which(self.binary)
        if self._executable is None:
            raise RedisServerMissing(self.binary)

    def _launch(self, log: Path) -> subprocess.Popen[bytes]:
        assert self._executable is not None and self.directory is not None
        # Persistence off and nothing written but the log: a test server holds nothing worth
        # keeping, and a dump would be read back by the next start on the same directory.
        return subprocess.Popen(  # noqa: S603 (our own arguments, the binary from PATH)
            [self._executable, "--port", str(self.port), "--bind", self.host,
             "--dir", str(self.directory), "--logfile", str(log),
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _answers(self) -> bool | None:
        """``INFO server``'s ``process_id`` is the process this object launched."""
        client = self.client(timeout=0.5)
        try:
            answering = client.info("server").get("process_id")
        except redis.RedisError:
            return None
        finally:
            client.close()
        return answering == self.pid

    def _before_stop(self) -> None:
        self.resume()
