"""What the suite's private servers (Redis, PostgreSQL, MariaDB) have in common: one process that
this object started, on a free port of its own, in a temporary directory of its own; ``start``
returns once that very process answers, ``stop`` ends it and removes the directory.

A subclass says where its binaries are (:meth:`ServerProcess._locate`, raising the error that
names the Debian package), how a new directory is prepared (:meth:`ServerProcess._prepare`), how
the process is launched and whether the server answering on the port is the one it launched
(:meth:`ServerProcess._answers`): a server that happens to hold the port is never taken for ours.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

__all__ = ["ServerProcess", "free_port"]

# Below Linux's ephemeral range (32768-60999): ports handed out by bind(("", 0)) and outgoing
# connections never land here, so a port chosen early stays free until the server binds it.
_PORT_RANGE = (20000, 32767)


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


class ServerProcess:
    """One server process on ``host:port``. ``port=None`` picks a free one now, so URLs are known
    before :meth:`start`. :meth:`halt` (or :meth:`kill`) then :meth:`start` restarts it on the
    same port and data; :meth:`stop` ends it for good."""

    name: ClassVar[str]  # the binary's name: messages and the directory's prefix
    log_name: ClassVar[str]  # the server's log, inside the directory
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM  # the server's clean shutdown
    stop_wait: ClassVar[float] = 10.0  # seconds before a clean shutdown becomes SIGKILL
    poll_interval: ClassVar[float] = 0.1
    start_timeout: ClassVar[float] = 30.0

    def __init__(
        self, port: int | None = None, *, host: str = "127.0.0.1", directory: Path | None = None
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._own_directory = directory is None
        self.directory = Path(directory) if directory is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # -- what a server says about itself --------------------------------------------------------

    def _locate(self) -> None:
        """Find the binaries, or raise the error that names the package to install."""

    def _prepare(self) -> None:
        """Fill a new directory before the first launch (a database cluster)."""

    def _launch(self, log: Path) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _answers(self) -> bool | None:
        """None: nothing answers yet; True: the process this object launched answers; False:
        another server holds the port (never used)."""
        raise NotImplementedError

    def _first_ready(self) -> None:
        """Once the new server answers for the first time (make a database, a user...)."""

    def _before_stop(self) -> None:
        """Put the process in a state where it can obey :attr:`stop_signal` (resume a pause)."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Prepare a directory on first start, launch, return once the process answers as
        itself; otherwise kill it and raise ``RuntimeError`` with the end of its log."""
        if self.process is not None:
            raise RuntimeError(f"this {self.name} is already running")
        self._locate()
        fresh = self.directory is None
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix=f"chatkit-{self.name}-"))
        log = self.directory / self.log_name
        try:
            if fresh:
                self._prepare()
            self.process = self._launch(log)
            deadline = time.monotonic() + (timeout or self.start_timeout)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break  # exited: port taken, bad option...
                answer = self._answers()
                if answer is None:
                    time.sleep(self.poll_interval)
                    continue
                if answer:
                    if fresh:
                        self._first_ready()
                    return
                break  # another server holds the port: never use it
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise RuntimeError(f"{self.name} did not start on {self.host}:{self.port}: {tail}")
        except BaseException:
            self._end(signal.SIGKILL)
            if fresh and self._own_directory:
                self._remove_directory()
            raise

    def stop(self) -> None:
        """End the process cleanly and remove the directory this object created."""
        if self.process is not None:
            self._before_stop()
            self._end(self.stop_signal)
        if self._own_directory:
            self._remove_directory()

    def halt(self) -> None:
        """Stop cleanly, keeping the data and the port for a later :meth:`start` (a restart)."""
        self._end(self.stop_signal)

    def kill(self) -> None:
        """SIGKILL, keeping the port and directory for a later :meth:`start` (a crash)."""
        assert self.process is not None, "not running"
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.halt()
        self.start()

    def _end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=self.stop_wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
