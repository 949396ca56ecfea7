"""A private PostgreSQL server for tests and benchmarks: its own cluster in a temporary directory,
its own port, its unix socket inside that directory, stopped (and the directory removed) when done.

Tests and the bench use this instead of a database somebody else runs::

    with PostgresServer() as server:
        url = server.url()  # postgresql+psycopg://chatkit@127.0.0.1:<port>/chatkit

The binaries (``initdb``, ``pg_ctl``, ``postgres``) come from the system's PostgreSQL (Debian
package ``postgresql-15``, found under ``/usr/lib/postgresql/*/bin`` or on PATH);
:class:`PostgresServerMissing` says so when they are not installed. Runs as root too (the cluster
then belongs to a system user that may own the directory: ``nobody`` unless ``postgres`` exists).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

from chatkit_flask.testing.server_process import ServerProcess

__all__ = ["POSTGRES_PACKAGE", "PostgresServer", "PostgresServerMissing", "find_postgres_bin"]

POSTGRES_PACKAGE = "postgresql-15"  # the Debian package that ships initdb, pg_ctl and postgres
DATABASE = "chatkit"
USER = "chatkit"


class PostgresServerMissing(RuntimeError):
    """PostgreSQL's server binaries are not installed."""

    def __init__(self) -> None:
        super().__init__(
            "PostgreSQL's initdb/postgres not found: install the Debian package "
            f"{POSTGRES_PACKAGE} (apt-get install {POSTGRES_PACKAGE}; .ci/setup.sh does it)"
        )


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres`` (newest installed major first)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    return None


def _run_as() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: the account to run it as, or None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists")


class PostgresServer(ServerProcess):
    """One ``postgres`` process on ``127.0.0.1:port`` that this object started, with a database
    ``chatkit`` owned by the passwordless (trust) user ``chatkit``.

    ``port=None`` picks a free one now, so :meth:`url` is known before :meth:`start`. The server
    may be stopped and started again on the same port and data (:meth:`restart`, fault tests).
    """

    name = "postgres"
    log_name = "postgres.log"
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT  # fast shutdown
    stop_wait: ClassVar[float] = 20.0

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1") -> None:
        super().__init__(port, host=host)
        self._bin: Path | None = None
        self._user = _run_as()

    def url(self, driver: str = "psycopg", database: str = DATABASE) -> str:
        return f"postgresql+{driver}://{USER}@{self.host}:{self.port}/{database}"

    @property
    def data_dir(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "data"

    # -- ServerProcess --------------------------------------------------------------------------

    def _locate(self) -> None:
        self._bin = self._bin or find_postgres_bin()
        if self._bin is None:
            raise PostgresServerMissing()

    def _prepare(self) -> None:
        assert self._bin is not None and self.directory is not None
        self._chown(self.directory)
        self._as_owner(
            [str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", USER,
             "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
        )  # fmt: skip

    def _launch(self, log: Path) -> subprocess.Popen[bytes]:
        assert self._bin is not None and self.directory is not None
        # fsync off: a test cluster holds nothing worth keeping and the disk is shared.
        return subprocess.Popen(  # noqa: S603 (our own arguments)
            [str(self._bin / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
             "-h", self.host, "-k", str(self.directory), "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, user=self._uid(), group=self._gid(),
        )  # fmt: skip

    def _answers(self) -> bool | None:
        """Another server on the port would answer too: ours serves our data directory."""
        if not self._ready():
            return None
        return self._psql("SHOW data_directory") == str(self.data_dir)

    def _first_ready(self) -> None:
        self._psql(f"CREATE DATABASE {DATABASE}")

    def _ready(self) -> bool:
        assert self._bin is not None
        result = subprocess.run(  # noqa: S603
            [str(self._bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-U", USER,
             "-d", "postgres", "-q"],
            check=False,
        )  # fmt: skip
        return result.returncode == 0

    def _psql(self, sql: str) -> str:
        result = subprocess.run(  # noqa: S603
            [str(self._bin / "psql"), "-h", self.host, "-p", str(self.port), "-U", USER,
             "-d", "postgres", "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=False, capture_output=True, text=True,
        )  # fmt: skip
        return result.stdout.strip() if result.returncode == 0 else ""

    def _uid(self) -> int | None:
        return self._user.pw_uid if self._user else None

    def _gid(self) -> int | None:
        return self._user.pw_gid if self._user else None

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _as_owner(self, argv: list[str]) -> None:
        result = subprocess.run(  # noqa: S603
            argv, capture_output=True, user=self._uid(), group=self._gid(), check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {result.stderr.decode()[-800:]}")
