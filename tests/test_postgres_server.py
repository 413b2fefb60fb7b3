"""The PostgreSQL harness itself (tests/support/postgres.py): the servers the store tests rely
on are real, local-only, isolated per test, unprivileged, and survive a crash with what they
committed."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import psycopg
import pytest

from tests.support.postgres import SYSTEM_USER, PostgresServer

pytestmark = pytest.mark.integration


def _one(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return [name for (name,) in rows]


def test_connects_and_runs_a_query(postgres_dsn: str) -> None:
    assert _one(postgres_dsn, "SELECT 1") == 1
    assert postgres_dsn.startswith("postgresql://postgres@127.0.0.1:")


def test_each_database_is_fresh_and_empty(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("CREATE TABLE leftover (id int)")
    other = postgres_server.create_database()

    assert other != postgres_dsn
    assert _one(other, "SELECT current_database()") != _one(
        postgres_dsn, "SELECT current_database()"
    )
    assert _tables(postgres_dsn) == ["leftover"]
    assert _tables(other) == []


def test_listens_on_loopback_and_its_own_socket_directory(
    postgres_server: PostgresServer,
) -> None:
    dsn = postgres_server.dsn()
    assert _one(dsn, "SHOW listen_addresses") == "127.0.0.1"
    assert _one(dsn, "SHOW unix_socket_directories") == str(postgres_server.directory)
    assert _one(dsn, "SHOW max_connections") == "200"
    assert _one(dsn, "SHOW fsync") == "off"
    # The unix socket answers too, and the cluster lives in the server's temporary directory.
    with psycopg.connect(
        host=str(postgres_server.directory), port=postgres_server.port, user="postgres"
    ) as conn:
        row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert row == (str(postgres_server.data_dir),)


def test_runs_as_an_unprivileged_user(postgres_server: PostgresServer) -> None:
    expected = pwd.getpwnam(SYSTEM_USER).pw_uid if os.geteuid() == 0 else os.geteuid()
    assert expected != 0
    data_directory = _one(postgres_server.dsn(), "SELECT current_setting('data_directory')")
    assert Path(str(data_directory)).stat().st_uid == expected
    pid = postgres_server.pid
    assert pid is not None
    assert _one(postgres_server.dsn(), "SELECT pg_backend_pid()") != pid
    if Path("/proc").is_dir():  # Linux: the postmaster's real, effective and saved uids
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert {int(uid) for uid in uids} == {expected}


def test_a_killed_server_restarts_with_what_it_committed(own_postgres: PostgresServer) -> None:
    dsn = own_postgres.create_database()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE kept (id int)")
        conn.execute("INSERT INTO kept VALUES (1)")
    uncommitted = psycopg.connect(dsn)
    try:
        uncommitted.execute("INSERT INTO kept VALUES (2)")
        port, first_pid = own_postgres.port, own_postgres.pid

        own_postgres.kill()

        assert not own_postgres.running
        assert own_postgres.pid is None
        with pytest.raises(psycopg.OperationalError):
            uncommitted.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=2).close()
    finally:
        uncommitted.close()

    own_postgres.start()

    assert (own_postgres.port, own_postgres.data_dir.is_dir()) == (port, True)
    assert own_postgres.pid not in (None, first_pid)
    assert _one(dsn, "SELECT array_agg(id) FROM kept") == [1]
    own_postgres.kill()  # a no-op once more: idempotent
    own_postgres.kill()


def test_stops_and_restarts_cleanly_and_removes_its_directory() -> None:
    with PostgresServer() as server:
        dsn = server.create_database()
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TABLE kept AS SELECT 7 AS id")
        server.stop()
        server.stop()
        assert not server.running
        server.start()
        assert _one(dsn, "SELECT id FROM kept") == 7
        directory = server.directory
    assert not server.running
    assert not directory.exists()
