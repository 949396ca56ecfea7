"""The suite owns its services: the Redis it writes to (and flushes) is a ``redis-server`` it
started itself, never a developer's server on 6379 or anyone else's."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import redis

from chatkit_flask.testing import mariadb_server
from chatkit_flask.testing.mariadb_server import MariaDBServer, MariaDBServerMissing
from chatkit_flask.testing.postgres_server import PostgresServer
from chatkit_flask.testing.redis_server import RedisServer, RedisServerMissing
from tests.services import (
    MYSQL_URL,
    REDIS_URL,
    start_mysql_or_skip,
    start_postgres_or_skip,
    start_redis_or_skip,
)

ROOT = Path(__file__).resolve().parents[1]

# A connection to a Redis on this machine's default port: a URL naming loopback with port 6379
# or no port at all, a client built with no arguments, or an explicit port=6379.
_DEFAULT_REDIS = re.compile(
    r"redis://(?:[^@/\s\"']*@)?(?:127\.0\.0\.1|localhost|\[::1\])(?::6379)?(?=[/\s\"'?]|$)"
    r"|\bRedis\(\s*\)"
    r"|\bport\s*=\s*6379\b"
    r"|-p\s+6379\b"
)


def test_the_suite_redis_is_a_process_the_suite_started(
    real_redis: redis.Redis, redis_server: RedisServer
) -> None:
    info = real_redis.info("server")
    assert info["process_id"] == redis_server.pid
    assert info["tcp_port"] == redis_server.port != 6379
    assert real_redis.connection_pool.connection_kwargs["port"] == redis_server.port
    assert f"redis://127.0.0.1:{redis_server.port}/15" == REDIS_URL
    served_from = Path(real_redis.config_get("dir")["dir"]).resolve()
    assert served_from == Path(redis_server.directory or "").resolve()
    assert served_from.is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert real_redis.config_get("save")["save"] == ""  # nothing persisted
    assert real_redis.config_get("appendonly")["appendonly"] == "no"


def test_a_private_server_never_takes_over_a_port_another_server_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check that makes the suite safe: a server already on the port is not ours, so start
    fails instead of handing out (and later flushing) somebody else's Redis."""
    other = start_redis_or_skip(RedisServer())
    try:
        other.client().set("their-data", "keep")
        intruder = RedisServer(port=other.port)
        made: list[str] = []
        mkdtemp = tempfile.mkdtemp

        def recorded_mkdtemp(**options: str) -> str:
            made.append(mkdtemp(**options))
            return made[-1]

        monkeypatch.setattr(tempfile, "mkdtemp", recorded_mkdtemp)
        with pytest.raises(RuntimeError, match=f"did not start on 127.0.0.1:{other.port}"):
            intruder.start()
        assert intruder.process is None
        assert len(made) == 1 and not Path(made[0]).exists()  # its directory is gone too
        assert other.client().get("their-data") == b"keep"
    finally:
        other.stop()


def test_stop_ends_the_process_and_removes_its_directory() -> None:
    server = start_redis_or_skip(RedisServer())
    process, directory = server.process, server.directory
    assert process is not None and directory is not None and directory.is_dir()
    server.stop()
    assert process.poll() is not None
    assert not directory.exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=server.port, socket_timeout=0.5).ping()


def test_a_missing_binary_names_the_debian_package() -> None:
    with pytest.raises(RedisServerMissing, match=r"install the Debian package redis-server"):
        RedisServer(binary="no-such-redis-server-binary").start()


# -- the suite's PostgreSQL ---------------------------------------------------------------------


@pytest.mark.postgres
def test_the_suite_postgres_is_a_cluster_the_suite_made(postgres_server: PostgresServer) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_server.url(), poolclass=sa.NullPool)
    with engine.connect() as db:
        data_directory = db.scalar(sa.text("SHOW data_directory"))
        port = int(db.scalar(sa.text("SHOW port")))
        fsync = db.scalar(sa.text("SHOW fsync"))
    engine.dispose()
    assert Path(data_directory) == postgres_server.data_dir
    assert postgres_server.data_dir.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert port == postgres_server.port != 5432  # never a developer's PostgreSQL
    assert fsync == "off"  # nothing worth keeping
    pid = int((postgres_server.data_dir / "postmaster.pid").read_text().split()[0])
    assert postgres_server.process is not None and pid == postgres_server.process.pid


@pytest.mark.postgres
def test_a_private_postgres_never_takes_over_a_port_another_server_holds() -> None:
    other = start_postgres_or_skip(PostgresServer())
    try:
        intruder = PostgresServer(port=other.port)
        with pytest.raises(RuntimeError, match=f"did not start on 127.0.0.1:{other.port}"):
            intruder.start()
        assert intruder.process is None and intruder.directory is None  # its cluster is gone
    finally:
        other.stop()
    assert other.directory is None


# -- the suite's MariaDB (the SQL store's mysql+pymysql:// tests) ---------------------------------


@pytest.mark.mysql
def test_the_suite_mysql_is_a_mariadb_the_suite_started(mysql_server: MariaDBServer) -> None:
    import sqlalchemy as sa

    assert mysql_server.url() == MYSQL_URL
    engine = sa.create_engine(mysql_server.url(), poolclass=sa.NullPool)
    with engine.connect() as db:  # the password user, over TCP
        datadir, port, pid_file, version = db.execute(
            sa.text("SELECT @@datadir, @@port, @@pid_file, @@version")
        ).one()
        user = db.scalar(sa.text("SELECT current_user()"))
    engine.dispose()
    assert Path(datadir).resolve() == mysql_server.data_dir.resolve()
    assert mysql_server.data_dir.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert int(port) == mysql_server.port != 3306  # never a developer's or the system's MySQL
    assert "MariaDB" in version
    assert user == "chatkit@%"
    assert mysql_server.process is not None
    assert int(Path(pid_file).read_text()) == mysql_server.process.pid


@pytest.mark.mysql
def test_a_private_mariadb_never_takes_over_a_port_another_server_holds() -> None:
    other = start_mysql_or_skip(MariaDBServer())
    try:
        intruder = MariaDBServer(port=other.port)
        with pytest.raises(RuntimeError, match=f"did not start on 127.0.0.1:{other.port}"):
            intruder.start()
        assert intruder.process is None and intruder.directory is None  # its data is gone
        directory = other.directory
    finally:
        other.stop()
    assert other.directory is None and directory is not None and not directory.exists()


def test_missing_mariadb_binaries_name_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mariadb_server, "find_mariadb_bins", lambda: None)
    with pytest.raises(MariaDBServerMissing, match=r"install the Debian package mariadb-server"):
        MariaDBServer().start()


def default_redis_uses(root: Path) -> list[str]:
    """``path:line: text`` of each line in tests/ and bench/ that connects to a default Redis."""
    found = []
    for path in sorted([*root.glob("tests/**/*.py"), *root.glob("bench/**/*.py")]):
        if path.resolve() == Path(__file__).resolve():
            continue  # the examples above
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _DEFAULT_REDIS.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_the_pattern_finds_each_way_of_reaching_the_default_redis(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        'URL = "redis://127.0.0.1:6379/15"\n'
        'OTHER = "redis://:pw@localhost/0"\n'
        "client = redis.Redis()\n"
        "client = redis.Redis(host='127.0.0.1', port=6379)\n"
        "cmd = 'redis-cli -p 6379 flushdb'\n"
        'FINE = "redis://127.0.0.1:1/11"  # nothing listens on port 1\n'
        'ALSO_FINE = "redis://cache.example:6379/0"\n'
    )
    found = [line.split(":")[1] for line in default_redis_uses(tmp_path)]
    assert found == ["1", "2", "3", "4", "5"]


def test_no_test_or_bench_module_connects_to_the_default_redis() -> None:
    assert default_redis_uses(ROOT) == []
