"""A private MariaDB server for tests: its own data directory in a temporary directory, its own
port on 127.0.0.1, its unix socket inside that directory, stopped (and the directory removed)
when done. The SQL store's ``mysql+pymysql://`` URLs are tested against it::

    with MariaDBServer() as server:
        url = server.url()  # mysql+pymysql://chatkit:<password>@127.0.0.1:<port>/chatkit

The binaries (``mariadbd``, ``mariadb-install-db``) come from the system (Debian package
``mariadb-server``; its service is never used); :class:`MariaDBServerMissing` says so when they
are not installed. As root the server runs as root (``--user=root``). The server's character
set and collation are Debian's (``utf8mb4``, ``utf8mb4_general_ci``, case-insensitive), so a
table that does not declare its own collation shows it in the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar

from chatkit_flask.testing.server_process import ServerProcess

__all__ = ["MARIADB_PACKAGE", "MariaDBServer", "MariaDBServerMissing", "find_mariadb_bins"]

MARIADB_PACKAGE = "mariadb-server"  # the Debian package that ships mariadbd and mariadb-install-db
DATABASE = "chatkit"
USER = "chatkit"
PASSWORD = "chatkit-test-password"  # noqa: S105 (a throwaway server on loopback)
_SBIN = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")


class MariaDBServerMissing(RuntimeError):
    """MariaDB's server binaries are not installed."""

    def __init__(self) -> None:
        super().__init__(
            "MariaDB's mariadbd/mariadb-install-db not found: install the Debian package "
            f"{MARIADB_PACKAGE} (apt-get install {MARIADB_PACKAGE}; .ci/install-mariadb.sh does it)"
        )


def _find(*names: str) -> Path | None:
    for name in names:
        found = shutil.which(name, path=os.pathsep.join([*_SBIN, os.environ.get("PATH", "")]))
        if found:
            return Path(found)
    return None


def find_mariadb_bins() -> tuple[Path, Path] | None:
    """(the server, the data directory installer), or None when either is missing."""
    server = _find("mariadbd", "mysqld")
    installer = _find("mariadb-install-db", "mysql_install_db")
    return (server, installer) if server and installer else None


class MariaDBServer(ServerProcess):
    """One ``mariadbd`` on ``127.0.0.1:port`` that this object started, with a database
    ``chatkit`` and a user ``chatkit`` (password :data:`PASSWORD`) allowed everything (tests
    make and drop databases). ``root`` has no password, on the socket and on loopback."""

    name = "mariadb"
    log_name = "mariadb.log"
    stop_wait: ClassVar[float] = 30.0

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1") -> None:
        super().__init__(port, host=host)
        self._bins: tuple[Path, Path] | None = None

    def url(self, driver: str = "pymysql", database: str = DATABASE) -> str:
        return f"mysql+{driver}://{USER}:{PASSWORD}@{self.host}:{self.port}/{database}"

    @property
    def data_dir(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "data"

    @property
    def socket_path(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "mariadb.sock"

    def root(self, **options: Any) -> Any:
        """A PyMySQL connection as ``root`` over TCP (autocommit)."""
        import pymysql

        return pymysql.connect(
            host=self.host, port=self.port, user="root", autocommit=True, connect_timeout=2,
            **options,
        )  # fmt: skip

    # -- ServerProcess --------------------------------------------------------------------------

    def _locate(self) -> None:
        self._bins = self._bins or find_mariadb_bins()
        if self._bins is None:
            raise MariaDBServerMissing()

    def _options(self) -> list[str]:
        """What the installer and the server share. The redo log small and flushed once a
        second, no doublewrite, no binary log: a test server holds nothing worth keeping and
        the disk is shared."""
        as_user = ["--user=root"] if os.geteuid() == 0 else []  # it refuses root otherwise
        return ["--no-defaults", f"--datadir={self.data_dir}", *as_user,
                "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M",
                "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0",
                "--skip-log-bin", "--skip-name-resolve"]  # fmt: skip

    def _prepare(self) -> None:
        assert self._bins is not None
        result = subprocess.run(  # noqa: S603 (our own arguments)
            [str(self._bins[1]), *self._options(), "--auth-root-authentication-method=normal",
             "--skip-test-db"],
            capture_output=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(f"{self._bins[1].name} failed: {output[-800:]}")

    def _launch(self, log: Path) -> subprocess.Popen[bytes]:
        assert self._bins is not None and self.directory is not None
        return subprocess.Popen(  # noqa: S603 (our own arguments)
            [str(self._bins[0]), *self._options(), f"--port={self.port}",
             f"--bind-address={self.host}", f"--socket={self.socket_path}",
             f"--pid-file={self.directory / 'mariadb.pid'}", f"--log-error={log}",
             f"--tmpdir={self.directory}", "--character-set-server=utf8mb4",
             "--collation-server=utf8mb4_general_ci", "--max-connections=300"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _answers(self) -> bool | None:
        """Over TCP, as root without a password: ours serves our data directory (another
        server refuses root or names its own)."""
        import pymysql

        try:
            connection = self.root()
        except pymysql.err.OperationalError as exc:
            return None if exc.args and exc.args[0] in (2003, 2013) else False  # not yet
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT @@datadir")
                (datadir,) = cursor.fetchone()
        finally:
            connection.close()
        return Path(datadir).resolve() == self.data_dir.resolve()

    def _first_ready(self) -> None:
        connection = self.root()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {DATABASE}")
                cursor.execute(f"CREATE USER '{USER}'@'%%' IDENTIFIED BY %s", (PASSWORD,))
                cursor.execute(f"GRANT ALL ON *.* TO '{USER}'@'%'")
        finally:
            connection.close()
