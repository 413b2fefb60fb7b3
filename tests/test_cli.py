"""The command line, `python -m eventbus`, against real SQLite stores built by a real bus."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from eventbus import DeadLetter, Event, EventBus, RetryPolicy
from eventbus._cli import EXIT_BROKEN_PIPE, MIN_ERROR_WIDTH, main
from eventbus.stores import SQLiteStore
from eventbus.testing import FakeClock, InlineExecutor

ERROR = "ConnectionError: SMTP down"


@dataclass(frozen=True)
class OrderShipped:
    """A typed event, stored as a dataclass payload."""

    order_id: int
    carrier: str


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


def new_bus(path: Path, **options: Any) -> EventBus:
    """A bus on the store at *path* that runs handlers inline."""
    return EventBus(
        store=SQLiteStore(path), executor=InlineExecutor(), clock=FakeClock(), **options
    )


def make_dead_letters(path: Path, *payloads: Any, message: str = "SMTP down") -> list[DeadLetter]:
    """Emit one "order:created" event per payload to a handler that always fails, on a bus
    with one attempt per delivery, and return the dead letters left in the store."""

    def send_email(event: Event) -> None:
        raise ConnectionError(message)

    bus = new_bus(path, retry=RetryPolicy(max_attempts=1))
    bus.subscribe("order:created", send_email, name="send_email")
    for payload in payloads:
        bus.emit("order:created", payload, metadata={"request_id": "req-42"})
    letters = bus.dead_letters()
    bus.close()
    return letters


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A store file holding two dead letters, for orders 1 and 2."""
    path = tmp_path / "events.db"
    make_dead_letters(path, {"order_id": 1}, {"order_id": 2})
    return path


def letters_in(path: Path) -> list[DeadLetter]:
    """The dead letters now in the store at *path*."""
    store = SQLiteStore(path)
    try:
        return store.dead_letters()
    finally:
        store.close()


# -- dead-letters list -------------------------------------------------------------------------


def test_list_prints_a_table_row_per_dead_letter(db: Path) -> None:
    """`list` prints a header and one row per dead letter with its ids, handler and error."""
    first, second = letters_in(db)
    result = run("dead-letters", "list", "--store", db)
    assert result.code == 0
    header, *rows = result.out.splitlines()
    assert re.split(r"\s{2,}", header) == [
        *("ID", "EVENT", "EVENT ID", "HANDLER", "ATTEMPTS", "REASON"),
        *("FAILED AT (UTC)", "ERROR"),
    ]
    assert [row.split()[:6] for row in rows] == [
        [first.id, "order:created", first.event.id, "send_email", "1", "exhausted"],
        [second.id, "order:created", second.event.id, "send_email", "1", "exhausted"],
    ]
    assert all(row.endswith(ERROR) for row in rows)


def test_list_cuts_long_errors_to_the_terminal_width(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long error is cut with "..." so that each row fits the terminal's width."""
    path = tmp_path / "events.db"
    make_dead_letters(path, {"order_id": 1}, message="SMTP down " * 50)
    monkeypatch.setenv("COLUMNS", "250")
    rows = run("dead-letters", "list", "--store", path).out.splitlines()
    assert len(rows[1]) == 250
    assert rows[1].endswith("...")


def test_list_keeps_some_of_the_error_on_a_narrow_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal too narrow for the table, the error column keeps MIN_ERROR_WIDTH chars."""
    path = tmp_path / "events.db"
    make_dead_letters(path, {"order_id": 1}, message="SMTP down " * 50)
    monkeypatch.setenv("COLUMNS", "40")
    row = run("dead-letters", "list", "--store", path).out.splitlines()[1]
    error = row[row.index("ConnectionError") :]
    assert len(error) == MIN_ERROR_WIDTH
    assert error.endswith("...")


def test_list_wide_prints_whole_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`list --wide` prints each error in full, on one line, however narrow the terminal."""
    path = tmp_path / "events.db"
    message = "SMTP down " * 50
    make_dead_letters(path, {"order_id": 1}, message=message)
    monkeypatch.setenv("COLUMNS", "40")
    result = run("dead-letters", "list", "--wide", "--store", path)
    assert result.code == 0
    [row] = result.out.splitlines()[1:]
    assert row.endswith(f"ConnectionError: {message.strip()}")


def test_status_wide_prints_whole_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status --wide` prints each delivery's error in full, on one line."""
    path = tmp_path / "events.db"
    message = "SMTP down " * 50
    [letter] = make_dead_letters(path, {"order_id": 1}, message=message)
    monkeypatch.setenv("COLUMNS", "40")
    rows = run("status", letter.event.id, "--wide", "--store", path).out.splitlines()
    assert rows[1].endswith(f"ConnectionError: {message.strip()}")


def test_list_says_when_there_are_no_dead_letters(tmp_path: Path) -> None:
    """`list` on a store without dead letters says so and exits 0."""
    path = tmp_path / "events.db"
    make_dead_letters(path)
    result = run("dead-letters", "list", "--store", path)
    assert (result.code, result.out) == (0, "no dead letters\n")


def test_list_json_gives_every_field_of_every_dead_letter(db: Path) -> None:
    """`list --json` prints an array with full errors, tracebacks, metadata and payloads."""
    first, second = letters_in(db)
    result = run("dead-letters", "list", "--store", db, "--json")
    assert result.code == 0
    listed = result.json()
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


def test_list_json_shows_a_typed_payload_in_its_stored_form(tmp_path: Path) -> None:
    """A dataclass payload is listed as its stored JSON object with its type name."""
    path = tmp_path / "events.db"

    def notify_carrier(event: Event) -> None:
        raise ValueError("no such carrier")

    bus = new_bus(path, retry=RetryPolicy(max_attempts=1))
    bus.subscribe(OrderShipped, notify_carrier, name="notify_carrier")
    bus.emit(OrderShipped(order_id=7, carrier="ups"))
    bus.close()
    event = run("dead-letters", "list", "--store", path, "--json").json()[0]["event"]
    assert event["name"] == "OrderShipped"
    assert event["payload_type"] == f"{__name__}.OrderShipped"
    assert event["payload"] == {"order_id": 7, "carrier": "ups"}


def test_list_json_shows_an_unreadable_payload_as_null(db: Path) -> None:
    """A dead letter whose stored payload is not JSON is still listed, with a null payload."""
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE events SET payload = 'not json'")
    listed = run("dead-letters", "list", "--store", db, "--json").json()
    assert [(i["event"]["payload_type"], i["event"]["payload"]) for i in listed] == [
        (None, None),
        (None, None),
    ]


#: (column, stored text, words of the decoding error): one damaged field of a stored event.
DAMAGE = [
    pytest.param("occurred_at", "yesterday", "occurred_at is not an ISO 8601", id="bad-time"),
    pytest.param("metadata", "[]", "metadata must be a JSON object", id="metadata-list"),
    pytest.param("metadata", '{"a": 1}', "metadata 'a' is not a string", id="metadata-int"),
    pytest.param("name", "no spaces allowed", "event name", id="bad-name"),
    pytest.param("payload", "{not json", "not valid JSON", id="bad-payload"),
]
#: How `show` labels each stored column.
LABELS = {
    "name": "name",
    "metadata": "metadata",
    "occurred_at": "occurred at",
    "payload": "payload",
}


def damage(path: Path, event_id: str, column: str, text: str) -> None:
    """Overwrite one column of one stored event, as a hand edit or a faulty writer would."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"UPDATE events SET {column} = ? WHERE id = ?", (text, event_id))


@pytest.mark.parametrize(("column", "text", "why"), DAMAGE)
def test_list_and_show_a_dead_letter_whose_event_cannot_be_decoded(
    db: Path, column: str, text: str, why: str
) -> None:
    """A dead letter whose stored event cannot be decoded is listed and shown with the
    stored text of each field and why it cannot be decoded, exit 0."""
    first, second = letters_in(db)
    damage(db, first.event.id, column, text)
    table = run("dead-letters", "list", "--store", db)
    assert (table.code, table.err) == (0, "")
    assert [row.split()[0] for row in table.out.splitlines()[1:]] == [first.id, second.id]
    listed = run("dead-letters", "list", "--json", "--store", db).json()
    event = listed[0]["event"]
    assert why in event["undecodable"]
    assert event["stored"][column] == text
    assert event["stored"]["name"] == (text if column == "name" else "order:created")
    assert "undecodable" not in listed[1]["event"]
    shown = run("dead-letters", "show", first.id, "--store", db)
    assert shown.code == 0
    lines = shown.out.splitlines()
    assert any(line.startswith("undecodable") and why in line for line in lines)
    assert f"  {LABELS[column]:<14}{text}" in lines
    assert run("dead-letters", "show", first.id, "--json", "--store", db).json() == listed[0]


def test_quarantined_row_is_listed_with_its_decoding_error(tmp_path: Path) -> None:
    """A row quarantined by recover() is listed with the decoding error, in full with
    --wide, and the good rows beside it were delivered."""
    path = tmp_path / "events.db"
    store = SQLiteStore(path)
    store.open()
    good, bad = Event(name="order:created"), Event(name="order:created")
    for event in (good, bad):
        store.add(event, ["send_email"])
    store.close()
    damage(path, bad.id, "occurred_at", "yesterday")
    delivered: list[str] = []
    bus = new_bus(path)
    bus.subscribe("order:created", lambda event: delivered.append(event.id), name="send_email")
    assert bus.recover() == 1
    bus.close()
    assert delivered == [good.id]
    result = run("dead-letters", "list", "--wide", "--store", path)
    assert result.code == 0
    [row] = result.out.splitlines()[1:]
    assert row.split()[1:4] == ["order:created", bad.id, "send_email"]
    assert row.endswith(
        "cannot decode the stored event: CodecError: "
        "event occurred_at is not an ISO 8601 timestamp: 'yesterday'"
    )


def test_replay_of_a_dead_letter_whose_event_cannot_be_decoded(db: Path) -> None:
    """`replay` of a dead letter whose stored event is damaged makes its delivery pending
    like any other, exit 0."""
    first, _ = letters_in(db)
    damage(db, first.event.id, "occurred_at", "yesterday")
    result = run("dead-letters", "replay", first.id, "--store", db)
    assert result.code == 0
    assert result.out.splitlines()[0] == f"replayed {first.id}  order:created -> send_email"
    status = run("status", first.event.id, "--json", "--store", db).json()
    assert [d["state"] for d in status] == ["pending"]


# -- dead-letters show -------------------------------------------------------------------------


def test_show_prints_one_dead_letter_in_full(db: Path) -> None:
    """`show ID` prints the dead letter's fields, its payload and its traceback."""
    letter = letters_in(db)[1]
    result = run("dead-letters", "show", letter.id, "--store", db)
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[:3] == [
        f"dead letter   {letter.id}",
        f"event         order:created  {letter.event.id}",
        f"occurred at   {letter.event.occurred_at:%Y-%m-%d %H:%M:%S} UTC",
    ]
    assert 'metadata      {"request_id": "req-42"}' in lines
    assert f"error         {ERROR}" in lines
    assert "payload type  (plain JSON)" in lines
    assert result.out.split("payload\n")[1].split("traceback\n")[0] == (
        '  {\n    "order_id": 2\n  }\n'
    )
    assert lines[lines.index("traceback") + 1] == "  Traceback (most recent call last):"
    assert lines[-1] == f"  {ERROR}"


def test_show_json_prints_one_object(db: Path) -> None:
    """`show ID --json` prints the same object as that dead letter's item in `list --json`."""
    letter = letters_in(db)[0]
    shown = run("dead-letters", "show", letter.id, "--store", db, "--json").json()
    assert shown == run("dead-letters", "list", "--store", db, "--json").json()[0]


def test_show_unknown_id_exits_1(db: Path) -> None:
    """`show` with an id that is not a dead letter says so on stderr and exits 1."""
    result = run("dead-letters", "show", "nope", "--store", db)
    assert (result.code, result.out) == (1, "")
    assert result.err == f"eventbus: no dead letter with id nope in {db}\n"


# -- dead-letters replay -----------------------------------------------------------------------


def test_replay_then_recover_delivers_to_the_fixed_handler(db: Path) -> None:
    """A replayed dead letter is delivered by the next bus's recover() and then succeeds."""
    letter = letters_in(db)[0]
    result = run("dead-letters", "replay", letter.id, "--store", db)
    assert result.code == 0
    assert result.out.splitlines()[0] == f"replayed {letter.id}  order:created -> send_email"
    assert result.out.splitlines()[1].startswith("1 dead letter replayed; a running service")
    delivered: list[str] = []

    def send_email(event: Event) -> None:
        delivered.append(event.id)

    bus = new_bus(db)
    bus.subscribe("order:created", send_email, name="send_email")
    assert bus.recover() == 1
    bus.close()
    assert delivered == [letter.event.id]
    status = run("status", letter.event.id, "--store", db, "--json").json()
    assert status == [{"handler": "send_email", "state": "succeeded", "attempts": 1, "error": None}]


def test_replay_leaves_the_delivery_pending_and_unowned(db: Path) -> None:
    """Replay deletes the dead letter and leaves its delivery pending with no attempts."""
    letter, other = letters_in(db)
    run("dead-letters", "replay", letter.id, "--store", db)
    assert [d.id for d in letters_in(db)] == [other.id]
    with closing(sqlite3.connect(db)) as conn:
        row = conn.execute(
            "SELECT state, attempts, owner FROM deliveries WHERE event_id = ?",
            (letter.event.id,),
        ).fetchone()
    assert row == ("pending", 0, None)


def test_replay_all_replays_every_dead_letter(db: Path) -> None:
    """`replay --all` replays each dead letter and leaves none."""
    ids = [letter.id for letter in letters_in(db)]
    result = run("dead-letters", "replay", "--all", "--store", db)
    assert result.code == 0
    assert [line.split()[1] for line in result.out.splitlines()[:2]] == ids
    assert result.out.splitlines()[2].startswith("2 dead letters replayed;")
    assert letters_in(db) == []


def test_replay_all_without_dead_letters_replays_nothing(tmp_path: Path) -> None:
    """`replay --all` on a store without dead letters says nothing was replayed, exit 0."""
    path = tmp_path / "events.db"
    make_dead_letters(path)
    result = run("dead-letters", "replay", "--all", "--store", path)
    assert (result.code, result.out, result.err) == (0, "no dead letters replayed\n", "")


def test_replay_unknown_id_exits_1_after_replaying_the_known_ones(db: Path) -> None:
    """Unknown ids are named on stderr with exit 1; the known ids given are replayed anyway."""
    first, second = letters_in(db)
    result = run("dead-letters", "replay", "nope", first.id, first.id, "--store", db)
    assert result.code == 1
    assert result.out.splitlines()[0] == f"replayed {first.id}  order:created -> send_email"
    assert result.err == (
        "eventbus: no dead letter with id nope\neventbus: 1 id not found (1 dead letter replayed)\n"
    )
    assert [letter.id for letter in letters_in(db)] == [second.id]


def test_replay_json_prints_the_replayed_ids(db: Path) -> None:
    """`replay --json` prints an object with the ids replayed and the ids not found, and
    still names each unknown id on stderr with exit 1."""
    first, second = letters_in(db)
    result = run("dead-letters", "replay", first.id, "nope", "--json", "--store", db)
    assert result.code == 1
    assert result.json() == {"replayed": [first.id], "not_found": ["nope"]}
    assert result.err.splitlines()[0] == "eventbus: no dead letter with id nope"
    assert [letter.id for letter in letters_in(db)] == [second.id]


def test_replay_all_json_lists_every_replayed_id(db: Path) -> None:
    """`replay --all --json` prints every replayed id, exit 0."""
    ids = [letter.id for letter in letters_in(db)]
    result = run("dead-letters", "replay", "--all", "--json", "--store", db)
    assert (result.code, result.err) == (0, "")
    assert result.json() == {"replayed": ids, "not_found": []}


@pytest.mark.parametrize(
    "targets", [(), ("--all", "some-id")], ids=["neither ids nor --all", "both"]
)
@pytest.mark.parametrize("command", ["replay", "purge"])
def test_ids_or_all_is_required(db: Path, command: str, targets: tuple[str, ...]) -> None:
    """`replay` and `purge` take dead letter ids or --all, exactly one: else exit 2."""
    result = run("dead-letters", command, *targets, "--store", db)
    assert (result.code, result.out) == (2, "")
    assert result.err.endswith("error: give dead letter ids or --all (one of the two)\n")
    assert len(letters_in(db)) == 2


# -- dead-letters purge ------------------------------------------------------------------------


def test_purge_deletes_the_given_dead_letters(db: Path) -> None:
    """`purge ID` deletes that dead letter only and prints what it purged."""
    first, second = letters_in(db)
    result = run("dead-letters", "purge", first.id, "--store", db)
    assert (result.code, result.err) == (0, "")
    assert result.out == f"purged {first.id}\n1 dead letter purged\n"
    assert [letter.id for letter in letters_in(db)] == [second.id]


def test_purge_unknown_id_exits_1_after_purging_the_known_ones(db: Path) -> None:
    """Unknown ids are named on stderr with exit 1; the known ids given are purged anyway."""
    first, second = letters_in(db)
    result = run("dead-letters", "purge", first.id, "nope", "--store", db)
    assert result.code == 1
    assert result.out == f"purged {first.id}\n1 dead letter purged\n"
    assert result.err.splitlines() == [
        "eventbus: no dead letter with id nope",
        "eventbus: 1 id not found (1 dead letter purged)",
    ]
    assert [letter.id for letter in letters_in(db)] == [second.id]


def test_purge_all_deletes_every_dead_letter_without_asking(db: Path) -> None:
    """`purge --all` asks nothing, deletes every dead letter and prints how many."""
    result = run("dead-letters", "purge", "--all", "--store", db)
    assert (result.code, result.out) == (0, "2 dead letters purged\n")
    assert letters_in(db) == []


def test_purge_json_prints_how_many(db: Path) -> None:
    """`purge ID --json` prints how many dead letters were purged and the ids not found."""
    first, second = letters_in(db)
    result = run("dead-letters", "purge", first.id, "nope", "--json", "--store", db)
    assert result.code == 1
    assert result.json() == {"purged": 1, "not_found": ["nope"]}
    assert [letter.id for letter in letters_in(db)] == [second.id]


def test_purge_all_json_prints_how_many(db: Path) -> None:
    """`purge --all --json` prints how many dead letters it deleted, exit 0."""
    result = run("dead-letters", "purge", "--all", "--json", "--store", db)
    assert (result.code, result.err) == (0, "")
    assert result.json() == {"purged": 2, "not_found": []}
    assert letters_in(db) == []


def test_purged_deliveries_stay_dead(db: Path) -> None:
    """A purged dead letter's delivery still shows as dead in `status`."""
    letter = letters_in(db)[0]
    run("dead-letters", "purge", "--all", "--store", db)
    result = run("status", letter.event.id, "--store", db, "--json")
    assert [d["state"] for d in result.json()] == ["dead"]


# -- status ------------------------------------------------------------------------------------


def test_status_prints_a_table_of_deliveries(tmp_path: Path) -> None:
    """`status EVENT_ID` prints each handler's state, attempts and error, sorted by handler."""
    path = tmp_path / "events.db"

    def fail(event: Event) -> None:
        raise ConnectionError("SMTP down")

    bus = new_bus(path, retry=RetryPolicy(max_attempts=1))
    bus.subscribe("order:created", fail, name="send_email")
    bus.subscribe("order:created", lambda event: None, name="audit")
    event = bus.emit("order:created", {"order_id": 1})
    bus.close()
    result = run("status", event.id, "--store", path)
    assert result.code == 0
    assert result.out.splitlines() == [
        "HANDLER     STATE      ATTEMPTS  ERROR",
        "audit       succeeded  1         -",
        f"send_email  dead       1         {ERROR}",
    ]


def test_status_json_prints_an_array_of_deliveries(db: Path) -> None:
    """`status EVENT_ID --json` prints one object per delivery."""
    letter = letters_in(db)[0]
    result = run("status", letter.event.id, "--store", db, "--json")
    assert result.json() == [
        {"handler": "send_email", "state": "dead", "attempts": 1, "error": ERROR}
    ]


def test_status_unknown_event_exits_1(db: Path) -> None:
    """`status` with an id of no stored event says so on stderr and exits 1."""
    result = run("status", "nope", "--store", db)
    assert (result.code, result.out) == (1, "")
    assert result.err == f"eventbus: no event with id nope in {db}\n"


# -- the store argument, help ------------------------------------------------------------------


def test_missing_store_file_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    """A --store path that does not exist is a usage error and no file is created."""
    path = tmp_path / "typo.db"
    result = run("dead-letters", "list", "--store", path)
    assert (result.code, result.out) == (2, "")
    assert result.err == f"eventbus: error: no store at {path}: the file does not exist\n"
    assert list(tmp_path.iterdir()) == []


def test_store_option_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --store, the command is a usage error (exit 2), printed to sys.stderr."""
    assert main(["status", "some-id"]) == 2
    captured = capsys.readouterr()
    assert "the following arguments are required: --store" in captured.err


def test_file_that_is_not_a_database_exits_2(tmp_path: Path) -> None:
    """A --store file that is not an SQLite database is a usage error, left as it was."""
    path = tmp_path / "notes.txt"
    path.write_text("not a database, " * 100)
    result = run("status", "some-id", "--store", path)
    assert result.code == 2
    assert result.err.startswith(f"eventbus: error: cannot open {path} as an eventbus store:")
    assert path.read_text() == "not a database, " * 100


def one_line_error(result: Result) -> str:
    """The single stderr line of a run that failed with a usage error, checked as such."""
    assert (result.code, result.out) == (2, "")
    [line] = result.err.splitlines()
    assert result.err == f"{line}\n"
    return line


def files_in(directory: Path) -> dict[str, int]:
    """Each file of *directory* with its size."""
    return {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}


def test_database_of_another_application_exits_2_and_is_left_alone(tmp_path: Path) -> None:
    """A --store file that is some other application's SQLite database is a one-line usage
    error naming the file; no table is added to it."""
    path = tmp_path / "orders.sqlite3"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    before = path.read_bytes()
    line = one_line_error(run("dead-letters", "list", "--store", path))
    assert line == (
        f"eventbus: error: {path} is an SQLite database of something else "
        "(tables: customers), not an eventbus store"
    )
    assert path.read_bytes() == before


def test_empty_file_is_not_an_eventbus_store_and_stays_empty(tmp_path: Path) -> None:
    """A 0-byte --store file is reported as not an eventbus store and is left 0 bytes, with
    no journal files beside it."""
    path = tmp_path / "events.db"
    path.touch()
    line = one_line_error(run("dead-letters", "list", "--store", path))
    assert line == f"eventbus: error: {path} is not an eventbus store: it is an empty database"
    assert files_in(tmp_path) == {"events.db": 0}


def test_directory_as_store_exits_2(tmp_path: Path) -> None:
    """A --store path that is a directory is a one-line usage error saying so."""
    line = one_line_error(run("status", "some-id", "--store", tmp_path))
    assert line == (
        f"eventbus: error: cannot open {tmp_path} as an eventbus store: it is a directory"
    )
    assert list(tmp_path.iterdir()) == []


def test_store_of_a_newer_schema_exits_2(db: Path) -> None:
    """A --store file written by a newer schema version is a one-line usage error that says
    to upgrade eventbus, and the file is left as it was."""
    from eventbus.stores.sqlite import SCHEMA_VERSION

    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    line = one_line_error(run("dead-letters", "list", "--store", db))
    assert line == (
        f"eventbus: error: {db} was written with store schema version {SCHEMA_VERSION + 1}; "
        f"this eventbus reads version {SCHEMA_VERSION}: upgrade eventbus"
    )
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


def test_store_missing_an_eventbus_table_exits_2(db: Path) -> None:
    """A --store file with only some of the eventbus tables is a one-line usage error naming
    what is missing; nothing is created."""
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DROP TABLE owners")
    line = one_line_error(run("dead-letters", "list", "--store", db))
    assert line == f"eventbus: error: {db} is not an eventbus store: tables missing: owners"
    with closing(sqlite3.connect(db)) as conn:
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "owners" not in tables


def test_not_a_database_error_is_one_line(tmp_path: Path) -> None:
    """A --store file that is not SQLite at all gets one line on stderr, exit 2."""
    path = tmp_path / "notes.txt"
    path.write_text("not a database, " * 100)
    line = one_line_error(run("dead-letters", "list", "--store", path))
    assert line.startswith(f"eventbus: error: cannot open {path} as an eventbus store: ")


def test_help_goes_to_the_given_stdout_and_returns_0() -> None:
    """`--help` of a subcommand is written to the injected stdout and returns 0."""
    result = run("dead-letters", "replay", "--help")
    assert result.code == 0
    assert result.out.startswith("usage: python -m eventbus dead-letters replay")
    assert "poll_interval" in result.out


def test_closed_output_pipe_ends_quietly(db: Path) -> None:
    """When the reader of a pipe has gone, output stops without an error and exit 141."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    err = io.StringIO()
    with open(write_end, "w") as out:
        code = main(["dead-letters", "list", "--json", "--store", str(db)], stdout=out, stderr=err)
    assert (code, err.getvalue()) == (EXIT_BROKEN_PIPE, "")


def test_python_m_eventbus_help_runs_in_a_subprocess() -> None:
    """`python -m eventbus --help` works as a real command and lists the commands."""
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: python -m eventbus")
    assert "dead-letters" in result.stdout
    assert "status" in result.stdout


def test_python_m_eventbus_on_another_applications_database_exits_2(tmp_path: Path) -> None:
    """The real command pointed at another application's SQLite file prints one line on
    stderr, no traceback, and exits 2."""
    path = tmp_path / "orders.sqlite3"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "dead-letters", "list", "--store", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"eventbus: error: {path} is an SQLite database of something else "
        "(tables: customers), not an eventbus store\n"
    )
