"""The command line, `python -m eventbus`, against real PostgresStores built by a real bus on a
real PostgreSQL server (tests/support/postgres.py): the commands of tests/test_cli.py that
read and write the store, and the ways a PostgreSQL store can fail to open."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

import eventbus._cli
from eventbus import DeadLetter, Event, EventBus, RetryPolicy
from eventbus._cli import main
from eventbus.stores import PostgresStore
from eventbus.stores.postgres import SCHEMA_VERSION
from eventbus.testing import FakeClock, InlineExecutor
from tests.support.net import free_port

pytestmark = pytest.mark.integration

ERROR = "ConnectionError: SMTP down"
PASSWORD = "s3cret-pw"


@dataclass(frozen=True)
class Result:
    """What one run of the command line returned and printed."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(*args: str | Path) -> Result:
    """Run the command line in this process with its output captured."""
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in args], stdout=out, stderr=err)
    return Result(code, out.getvalue(), err.getvalue())


def one_line_error(result: Result) -> str:
    """The single stderr line of a run that failed with a usage error, checked as such."""
    assert (result.code, result.out) == (2, "")
    [line] = result.err.splitlines()
    assert result.err == f"{line}\n"
    assert "Traceback" not in result.err
    return line


def with_password(dsn: str) -> str:
    """*dsn* (postgresql://postgres@...) with a password, which the test server ignores."""
    assert dsn.startswith("postgresql://postgres@")
    return dsn.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def make_dead_letters(dsn: str, *payloads: Any, schema: str = "eventbus") -> list[DeadLetter]:
    """Emit one "order:created" event per payload to a handler that always fails, on a bus
    with one attempt per delivery, and return the dead letters left in the store."""

    def send_email(event: Event) -> None:
        raise ConnectionError("SMTP down")

    bus = EventBus(
        store=PostgresStore(dsn, schema=schema),
        executor=InlineExecutor(),
        clock=FakeClock(),
        retry=RetryPolicy(max_attempts=1),
    )
    try:
        bus.subscribe("order:created", send_email, name="send_email")
        bus.subscribe("order:created", lambda event: None, name="audit")
        for payload in payloads:
            bus.emit("order:created", payload, metadata={"request_id": "req-42"})
        assert bus.drain(timeout=30)
        return bus.dead_letters()
    finally:
        bus.close()


def letters_in(dsn: str, schema: str = "eventbus") -> list[DeadLetter]:
    """The dead letters now in the store."""
    store = PostgresStore(dsn, schema=schema, create=False)
    try:
        return store.dead_letters()
    finally:
        store.close()


@pytest.fixture
def dsn(postgres_dsn: str) -> str:
    """A database whose store holds two dead letters, for orders 1 and 2."""
    make_dead_letters(postgres_dsn, {"order_id": 1}, {"order_id": 2})
    return postgres_dsn


# -- the commands --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_list_prints_a_table_row_per_dead_letter(dsn: str, scheme: str) -> None:
    """`list --store postgresql://...` (or postgres://) prints one row per dead letter."""
    first, second = letters_in(dsn)
    result = run("dead-letters", "list", "--store", dsn.replace("postgresql", scheme, 1))
    assert (result.code, result.err) == (0, "")
    header, *rows = result.out.splitlines()
    assert re.split(r"\s{2,}", header)[:6] == [
        *("ID", "EVENT", "EVENT ID", "HANDLER", "ATTEMPTS", "REASON"),
    ]
    assert [row.split()[:6] for row in rows] == [
        [first.id, "order:created", first.event.id, "send_email", "1", "exhausted"],
        [second.id, "order:created", second.event.id, "send_email", "1", "exhausted"],
    ]
    assert all(row.endswith(ERROR) for row in rows)


def test_list_json_gives_every_field_of_every_dead_letter(dsn: str) -> None:
    """`list --json` prints the stored payloads, metadata, full errors and tracebacks."""
    first, second = letters_in(dsn)
    listed = run("dead-letters", "list", "--json", "--store", dsn).json()
    assert [item["id"] for item in listed] == [first.id, second.id]
    item = listed[0]
    assert item["traceback"].rstrip().endswith(ERROR)
    assert item == {
        "id": first.id,
        "handler": "send_email",
        "attempts": 1,
        "reason": "exhausted",
        "error": ERROR,
        "traceback": item["traceback"],
        "failed_at": first.failed_at.isoformat(),
        "event": {
            "id": first.event.id,
            "name": "order:created",
            "occurred_at": first.event.occurred_at.isoformat(),
            "metadata": {"request_id": "req-42"},
            "payload_type": None,
            "payload": {"order_id": 1},
        },
    }


def test_list_says_when_there_are_no_dead_letters(postgres_dsn: str) -> None:
    """`list` on a store without dead letters says so and exits 0."""
    make_dead_letters(postgres_dsn)
    result = run("dead-letters", "list", "--store", postgres_dsn)
    assert (result.code, result.out, result.err) == (0, "no dead letters\n", "")


def test_show_prints_one_dead_letter_in_full(dsn: str) -> None:
    """`show ID` prints the dead letter's fields, its payload and its traceback; `--json`
    the same object as its item in `list --json`."""
    letter = letters_in(dsn)[1]
    result = run("dead-letters", "show", letter.id, "--store", dsn)
    assert (result.code, result.err) == (0, "")
    lines = result.out.splitlines()
    assert lines[:2] == [
        f"dead letter   {letter.id}",
        f"event         order:created  {letter.event.id}",
    ]
    assert f"error         {ERROR}" in lines
    assert result.out.split("payload\n")[1].split("traceback\n")[0] == (
        '  {\n    "order_id": 2\n  }\n'
    )
    assert lines[-1] == f"  {ERROR}"
    shown = run("dead-letters", "show", letter.id, "--json", "--store", dsn).json()
    assert shown == run("dead-letters", "list", "--json", "--store", dsn).json()[1]


def test_show_unknown_id_names_the_store_without_its_password(dsn: str) -> None:
    """`show` of an unknown id exits 1 naming the schema and database, but not the password
    of the connection string."""
    result = run("dead-letters", "show", "nope", "--store", with_password(dsn))
    assert (result.code, result.out) == (1, "")
    assert result.err == f"eventbus: no dead letter with id nope in schema 'eventbus' of {dsn}\n"


def test_replay_leaves_the_delivery_pending_and_unowned(dsn: str) -> None:
    """`replay ID` deletes the dead letter and leaves its delivery pending, unowned, with no
    attempts, for a service to run."""
    letter, other = letters_in(dsn)
    result = run("dead-letters", "replay", letter.id, "--store", dsn)
    assert (result.code, result.err) == (0, "")
    assert result.out.splitlines()[0] == f"replayed {letter.id}  order:created -> send_email"
    assert result.out.splitlines()[1].startswith("1 dead letter replayed; a running service")
    assert [d.id for d in letters_in(dsn)] == [other.id]
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT state, attempts, owner FROM eventbus.deliveries "
            "WHERE event_id = %s AND handler = 'send_email'",
            (letter.event.id,),
        ).fetchone()
    assert row == ("pending", 0, None)
    status = run("status", letter.event.id, "--json", "--store", dsn).json()
    assert [(d["handler"], d["state"]) for d in status] == [
        ("audit", "succeeded"),
        ("send_email", "pending"),
    ]


def test_replay_all_json_lists_every_replayed_id(dsn: str) -> None:
    """`replay --all --json` prints every replayed id and leaves no dead letter."""
    ids = [letter.id for letter in letters_in(dsn)]
    result = run("dead-letters", "replay", "--all", "--json", "--store", dsn)
    assert (result.code, result.err) == (0, "")
    assert result.json() == {"replayed": ids, "not_found": []}
    assert letters_in(dsn) == []


def test_purge_json_prints_how_many(dsn: str) -> None:
    """`purge ID --json` purges the known ids, names the unknown ones (exit 1); the purged
    delivery stays dead in `status`."""
    first, second = letters_in(dsn)
    result = run("dead-letters", "purge", first.id, "nope", "--json", "--store", dsn)
    assert result.code == 1
    assert result.json() == {"purged": 1, "not_found": ["nope"]}
    assert result.err.splitlines()[0] == "eventbus: no dead letter with id nope"
    assert [letter.id for letter in letters_in(dsn)] == [second.id]
    status = run("status", first.event.id, "--json", "--store", dsn).json()
    assert [d["state"] for d in status] == ["succeeded", "dead"]
    result = run("dead-letters", "purge", "--all", "--json", "--store", dsn)
    assert (result.code, result.json()) == (0, {"purged": 1, "not_found": []})
    assert letters_in(dsn) == []


def test_status_wide_prints_whole_errors(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status --wide` prints each delivery, sorted by handler, with its whole error."""
    letter = letters_in(dsn)[0]
    monkeypatch.setenv("COLUMNS", "40")
    result = run("status", letter.event.id, "--wide", "--store", dsn)
    assert (result.code, result.err) == (0, "")
    assert result.out.splitlines() == [
        "HANDLER     STATE      ATTEMPTS  ERROR",
        "audit       succeeded  1         -",
        f"send_email  dead       1         {ERROR}",
    ]


def test_status_unknown_event_exits_1(dsn: str) -> None:
    """`status` of an event the store does not hold says so on stderr, exit 1."""
    result = run("status", "nope", "--store", dsn)
    assert (result.code, result.out) == (1, "")
    assert result.err == f"eventbus: no event with id nope in schema 'eventbus' of {dsn}\n"


def test_schema_option_reads_the_store_in_that_schema(postgres_dsn: str) -> None:
    """`--schema NAME` reads the store kept in that schema, not the default one."""
    [letter] = make_dead_letters(postgres_dsn, {"order_id": 3}, schema="orders")
    listed = run("dead-letters", "list", "--json", "--schema", "orders", "--store", postgres_dsn)
    assert (listed.code, [item["id"] for item in listed.json()]) == (0, [letter.id])
    line = one_line_error(run("dead-letters", "list", "--store", postgres_dsn))
    assert line == (
        f"eventbus: error: {postgres_dsn}: no eventbus store in schema 'eventbus' of "
        f"database {postgres_dsn.rsplit('/', 1)[1]!r}"
    )


# -- stores that cannot be opened ------------------------------------------------------------


def test_unreachable_server_is_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server nobody listens for is a one-line usage error after the connect timeout,
    without the password or the pool's warnings."""
    monkeypatch.setattr(eventbus._cli, "CONNECT_TIMEOUT", 1.0)
    dsn = f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/app"
    line = one_line_error(run("dead-letters", "list", "--store", dsn))
    assert line.startswith("eventbus: error: cannot connect to PostgreSQL at ")
    assert "Connection refused" in line  # the server's (libpq's) reason
    assert PASSWORD not in line


def test_unreachable_server_in_a_process_of_its_own_prints_one_line() -> None:
    """Outside pytest (no logging set up), the pool's warnings about each failed connection
    attempt are not printed either: stderr is the one line, no traceback."""
    dsn = f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/app"
    script = (
        "import sys, eventbus._cli as cli; cli.CONNECT_TIMEOUT = 1.0; "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "dead-letters", "list", "--store", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = one_line_error(Result(result.returncode, result.stdout, result.stderr))
    assert line.startswith("eventbus: error: cannot connect to PostgreSQL at ")
    assert PASSWORD not in line


def test_database_without_a_store_exits_2_and_creates_nothing(postgres_dsn: str) -> None:
    """An empty database is a one-line usage error, and no schema is created in it."""
    line = one_line_error(run("status", "some-id", "--store", with_password(postgres_dsn)))
    database = postgres_dsn.rsplit("/", 1)[1]
    assert line == (
        f"eventbus: error: {postgres_dsn}: no eventbus store in schema 'eventbus' of "
        f"database {database!r}"
    )
    with psycopg.connect(postgres_dsn, connect_timeout=5) as conn:
        found = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'eventbus'"
        ).fetchone()
    assert found == (0,)


def test_store_of_a_newer_schema_exits_2_and_is_left_alone(dsn: str) -> None:
    """A store written by a newer schema version is a one-line usage error saying to upgrade
    eventbus; the version stays as it was."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        conn.execute("UPDATE eventbus.meta SET version = 99")
    line = one_line_error(run("dead-letters", "list", "--store", with_password(dsn)))
    assert line == (
        f"eventbus: error: {dsn}: schema 'eventbus' was written with store schema version 99; "
        f"this eventbus reads version {SCHEMA_VERSION}: upgrade eventbus"
    )
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        assert conn.execute("SELECT version FROM eventbus.meta").fetchone() == (99,)


def test_schema_that_is_not_an_identifier_exits_2(postgres_dsn: str) -> None:
    """A --schema that PostgresStore refuses is a one-line usage error."""
    line = one_line_error(run("status", "x", "--schema", "a-b", "--store", postgres_dsn))
    assert line == f"eventbus: error: {postgres_dsn}: schema must be a plain identifier, got 'a-b'"


def test_schema_with_an_sqlite_path_exits_2(tmp_path: Path) -> None:
    """--schema with an SQLite --store path is a one-line usage error; no file is created."""
    path = tmp_path / "events.db"
    line = one_line_error(run("dead-letters", "list", "--schema", "orders", "--store", path))
    assert line == (
        "eventbus: error: --schema is for a PostgreSQL store (--store postgresql://...), "
        f"not for the SQLite file {path}"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def without_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg cannot be imported, as when the postgres extra is not installed (the real
    modules come back at the end)."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "eventbus.stores.postgres")


@pytest.mark.usefixtures("without_psycopg")
def test_psycopg_not_installed_exits_2_naming_the_extra() -> None:
    """Without psycopg, a postgresql:// store is a one-line usage error saying what to
    install, without the password."""
    dsn = f"postgresql://app:{PASSWORD}@db.example.com/app"
    line = one_line_error(run("dead-letters", "list", "--store", dsn))
    assert line == (
        "eventbus: error: cannot open the PostgreSQL store postgresql://app@db.example.com/app: "
        "PostgresStore needs psycopg 3 and psycopg_pool: pip install 'eventbus[postgres]'"
    )
