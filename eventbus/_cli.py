"""The command line, ``python -m eventbus``: look at a :class:`~eventbus.stores.SQLiteStore`
file, or the database of a :class:`~eventbus.stores.PostgresStore` (``--store postgresql://...``,
``--schema NAME``), from outside the service that writes it.

* ``dead-letters list`` / ``show ID``: the dead letters, as a table (``--wide``: errors not
  cut) or ``--json``.
* ``dead-letters replay ID... | --all``: make their deliveries pending again, unowned, so that
  a running service (which polls the store after ``recover()``) or its next start delivers
  them.
* ``dead-letters purge ID... | --all``: delete dead letters.
* ``status EVENT_ID``: where each delivery of an event stands.
* ``dashboard [--port 8089] [--host 127.0.0.1]``: serve the web dashboard
  (:mod:`eventbus.dashboard`, ``pip install 'eventbus[dashboard]'``) until interrupted.

Exit codes: 0 done, 1 something named was not found (the rest was still done), 2 usage error
(bad arguments, or a store path that is missing, a directory, not an SQLite database, not an
eventbus store or of a newer schema; a PostgreSQL server out of reach, a schema without a
store, psycopg not installed), 141 the reader of the output went away (``... | head``). The
command line never creates a store file or writes a schema into one. A connection string's
password is never printed.

Payloads are shown in their stored JSON form, with their type name (``null`` for a plain JSON
payload): typed payloads are not rebuilt, so no class has to be importable or registered, and
every payload can be printed. A dead letter whose stored event cannot be decoded (a damaged
row) is shown with the stored text of each field and why it cannot be decoded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sqlite3
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, NoReturn, Protocol, TextIO
from urllib.parse import unquote, urlsplit, urlunsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from eventbus import stores
from eventbus._envelope import Envelope, from_envelope
from eventbus._event import DeadLetter, Delivery
from eventbus.codec import JsonCodec
from eventbus.exceptions import CodecError, StoreError
from eventbus.stores.sqlite import SQLiteStore

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE", "StoredPayload", "main"]

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
#: The reader of the output went away (``... | head``): what a shell reports for SIGPIPE.
EXIT_BROKEN_PIPE = 141

PROG = "python -m eventbus"

#: The error column of a table never gets narrower than this, however small the terminal.
MIN_ERROR_WIDTH = 30

#: What a ``--store`` naming a PostgreSQL database starts with.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
#: The PostgreSQL schema read when ``--schema`` is not given (PostgresStore's default).
DEFAULT_SCHEMA = "eventbus"
#: Seconds to wait for a PostgreSQL server before giving up on it.
CONNECT_TIMEOUT = 5.0
#: Where ``dashboard`` listens unless told otherwise: this machine only.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8089

_REPLAY_HINT = (
    "a running service (after recover()) runs replays within its poll_interval, "
    "otherwise its next start's recover() does."
)


@dataclass(frozen=True, slots=True)
class StoredPayload:
    """A payload as the store keeps it: its type name (``None`` for plain JSON) and its
    JSON value, not rebuilt into an instance of the type."""

    type_name: str | None
    value: Any


class _StoredFormCodec(JsonCodec):
    """Decodes every payload to a :class:`StoredPayload`, so typed payloads need no class."""

    def decode(self, type_name: str | None, text: str) -> StoredPayload:
        """The stored form of the payload; ``CodecError`` for text that is not JSON."""
        try:
            return StoredPayload(type_name, json.loads(text))
        except (TypeError, ValueError, RecursionError) as exc:
            raise CodecError(f"stored payload is not valid JSON: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Why a dead letter's stored event cannot be decoded, and its fields as stored."""

    why: str
    stored: Envelope


@dataclass(frozen=True, slots=True)
class _Output:
    """Where a command writes: results to ``out``, problems to ``err``."""

    out: TextIO
    err: TextIO

    def print(self, text: str = "") -> None:
        print(text, file=self.out)

    def problem(self, text: str) -> None:
        print(f"eventbus: {text}", file=self.err)


class _Store(Protocol):
    """What the commands use of a store: :class:`~eventbus.stores.SQLiteStore` and
    :class:`~eventbus.stores.PostgresStore` both have it."""

    @property
    def codec(self) -> JsonCodec: ...

    def dead_letters(self) -> list[DeadLetter]: ...

    def dead_letter(self, dead_letter_id: str) -> DeadLetter | None: ...

    def replay_dead_letter(self, dead_letter_id: str) -> DeadLetter | None: ...

    def purge_dead_letters(self, ids: Collection[str] | None = None) -> int: ...

    def status(self, event_id: str) -> Mapping[str, Delivery] | None: ...

    def _stored_event(self, event_id: str) -> Envelope | None: ...

    def close(self) -> None: ...


#: A command: runs on the opened store, ``args.where`` naming it in messages.
_Command = Callable[[_Store, argparse.Namespace, _Output], int]


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one command (*argv* defaults to ``sys.argv[1:]``) and return its exit code.

    Output goes to *stdout* and *stderr* (default: ``sys.stdout`` and ``sys.stderr`` at call
    time), help and usage errors too. Usage errors and ``--help`` return their code instead
    of raising ``SystemExit``; failing to open the store is a usage error. When *stdout* is a
    pipe whose reader has gone, the rest of the output is discarded and ``EXIT_BROKEN_PIPE``
    is returned, without a traceback.

    Raises ``sqlite3.Error`` when the database fails during a command (for instance stays
    locked by another process for longer than the store's busy timeout); for PostgreSQL,
    :class:`~eventbus.exceptions.StoreError` when the server goes out of reach during a
    command, or the driver's error.
    """
    output = _Output(
        sys.stdout if stdout is None else stdout, sys.stderr if stderr is None else stderr
    )
    try:
        with redirect_stdout(output.out), redirect_stderr(output.err):
            args = _parser().parse_args(argv)
            args.check(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    with _quiet_driver_logs():
        return _run(args, output)


def _run(args: argparse.Namespace, output: _Output) -> int:
    """Open the store, run the command on it, close it; the exit code."""
    opened = _open_store(args, output)
    if opened is None:
        return EXIT_USAGE
    store, args.where = opened
    command: _Command = args.command
    try:
        code = command(store, args, output)
        output.out.flush()  # here, so that a closed pipe is noticed here and not at exit
    except BrokenPipeError:
        _discard(output.out)
        return EXIT_BROKEN_PIPE
    finally:
        store.close()
    return code


def _open_store(args: argparse.Namespace, output: _Output) -> tuple[_Store, str] | None:
    """The store ``--store`` names, opened without creating anything, with how messages name
    it; or ``None`` after saying on one line why it cannot be."""
    if args.store.startswith(POSTGRES_SCHEMES):
        schema = DEFAULT_SCHEMA if args.schema is None else args.schema
        return _open_postgres(args.store, schema, output)
    if args.schema is not None:
        output.problem(
            "error: --schema is for a PostgreSQL store (--store postgresql://...), "
            f"not for the SQLite file {args.store}"
        )
        return None
    path = Path(args.store)
    store = _open_sqlite(path, output)
    return None if store is None else (store, str(path))


def _open_postgres(dsn: str, schema: str, output: _Output) -> tuple[_Store, str] | None:
    """The store in *schema* of the PostgreSQL database *dsn*, opened without creating
    anything, with how messages name it; or ``None`` after saying on one line why it cannot
    be (the password of *dsn* never shown)."""
    shown = _without_password(dsn)
    try:
        postgres_store = stores.PostgresStore  # imports psycopg, on first use only
    except ModuleNotFoundError as exc:
        if exc.name not in ("psycopg", "psycopg_pool"):
            raise
        output.problem(f"error: cannot open the PostgreSQL store {shown}: {exc}")
        return None
    try:
        store = postgres_store(
            dsn,
            schema=schema,
            connect_timeout=CONNECT_TIMEOUT,
            codec=_StoredFormCodec(),
            create=False,
        )
    except StoreError as exc:  # out of reach; its message names the server, no password
        output.problem(f"error: {exc}")
    except (ValueError, RuntimeError) as exc:  # no store there, a newer schema, a bad option
        output.problem(f"error: {shown}: {exc}")
    except Exception as exc:
        if not type(exc).__module__.startswith("psycopg"):
            raise
        output.problem(f"error: cannot open {shown} as an eventbus store: {_one_line(exc)}")
    else:
        return store, f"schema {schema!r} of {shown}"
    return None


def _without_password(dsn: str) -> str:
    """The ``postgresql://`` URL *dsn* without its password (in the user part or a
    ``password`` parameter), for messages."""
    try:
        parts = urlsplit(dsn)
    except ValueError:  # e.g. an unclosed [ in the host part
        return f"{dsn.partition('://')[0]}://... (cannot be parsed)"
    user, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}@{hosts}" if at else hosts
    query = "&".join(
        param
        for param in parts.query.split("&")
        if param and unquote(param.partition("=")[0]).strip() != "password"
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@contextmanager
def _quiet_driver_logs() -> Iterator[None]:
    """Silence the log records of psycopg (its pool warns of each failed connection attempt)
    when logging is not set up: Python would print them to stderr beside the command line's
    one line. Where logging is set up, its handlers get them as usual."""
    logger = logging.getLogger("psycopg")
    if logger.hasHandlers():
        yield
        return
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _open_sqlite(path: Path, output: _Output) -> SQLiteStore | None:
    """The store in the existing file *path*, opened without creating anything, or ``None``
    after saying on one line why it cannot be."""
    if not path.exists():
        output.problem(f"error: no store at {path}: the file does not exist")
        return None
    cannot = f"error: cannot open {path} as an eventbus store"
    if path.is_dir():
        output.problem(f"{cannot}: it is a directory")
        return None
    try:
        return SQLiteStore(path, codec=_StoredFormCodec(), create=False)
    except sqlite3.Error as exc:
        output.problem(f"{cannot}: {exc}")
    except OSError as exc:
        output.problem(f"{cannot}: {exc.strerror or exc}")
    except (ValueError, RuntimeError) as exc:  # the store's own refusals, naming the file
        output.problem(f"error: {exc}")
    return None


def _discard(stream: TextIO) -> None:
    """Point *stream*'s file descriptor at the null device, so that flushing the rest of its
    buffer (at interpreter exit too) cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


# -- the parser ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store",
        required=True,
        metavar="PATH|DSN",
        help="the SQLiteStore database file, or a PostgresStore's database: postgresql://...",
    )
    store.add_argument(
        "--schema",
        metavar="NAME",
        help=f"the PostgreSQL schema of the store (default: {DEFAULT_SCHEMA}); "
        "only with --store postgresql://...",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts")
    wide = argparse.ArgumentParser(add_help=False)
    wide.add_argument(
        "--wide", action="store_true", help="print errors in full instead of cutting them"
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect an eventbus store (an SQLite file or a PostgreSQL database): "
        "dead letters and delivery status.",
        epilog="Exit codes: 0 done, 1 not found, 2 usage error, 141 output pipe closed.",
    )
    parser.set_defaults(check=_no_check)
    groups = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    letters = groups.add_parser(
        "dead-letters", help="list, show, replay or purge dead letters"
    ).add_subparsers(title="commands", required=True, metavar="COMMAND")
    listing = letters.add_parser(
        "list", parents=[store, as_json, wide], help="list every dead letter, oldest first"
    )
    listing.set_defaults(command=_list)
    show = letters.add_parser(
        "show", parents=[store, as_json], help="one dead letter in full: traceback, payload"
    )
    show.add_argument("id", metavar="ID", help="a dead letter id")
    show.set_defaults(command=_show)
    _add_targets(
        letters.add_parser(
            "replay",
            parents=[store, as_json],
            help="make dead letters' deliveries pending again, for the service to run",
            description="Delete the dead letters and make their deliveries pending again, "
            f"unowned, with a fresh attempt count: {_REPLAY_HINT}",
        ),
        verb="replay",
        command=_replay,
    )
    _add_targets(
        letters.add_parser(
            "purge",
            parents=[store, as_json],
            help="delete dead letters (their deliveries stay recorded as dead)",
        ),
        verb="purge",
        command=_purge,
    )

    status = groups.add_parser(
        "status", parents=[store, as_json, wide], help="where each delivery of an event stands"
    )
    status.add_argument("event_id", metavar="EVENT_ID", help="an event id")
    status.set_defaults(command=_status)

    dashboard = groups.add_parser(
        "dashboard",
        parents=[store],
        help="serve the web dashboard (needs eventbus[dashboard]) until interrupted",
    )
    dashboard.add_argument(
        "--port", default=str(DEFAULT_PORT), help=f"the TCP port (default: {DEFAULT_PORT})"
    )
    dashboard.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"the address to listen on (default: {DEFAULT_HOST}, this machine only)",
    )
    dashboard.set_defaults(command=_dashboard, check=_check_dashboard)
    return parser


def _add_targets(parser: argparse.ArgumentParser, *, verb: str, command: _Command) -> None:
    """Dead letter ids or ``--all``, exactly one of the two (checked after parsing)."""
    parser.add_argument("ids", nargs="*", metavar="ID", help=f"dead letter ids to {verb}")
    parser.add_argument("--all", action="store_true", help=f"{verb} every dead letter")

    def check(args: argparse.Namespace) -> None:
        if args.all == bool(args.ids):
            parser.error("give dead letter ids or --all (one of the two)")

    parser.set_defaults(command=command, check=check)


def _no_check(args: argparse.Namespace) -> None:
    """Commands whose arguments argparse checks on its own."""


def _usage_error(text: str) -> NoReturn:
    """One line on stderr (redirected by ``main``) and the usage exit code."""
    print(f"eventbus: error: {text}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _check_dashboard(args: argparse.Namespace) -> None:
    """A port from 1 to 65535 and a host; Flask importable (before the store is opened)."""
    port = args.port.strip()
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        _usage_error(f"--port must be a whole number from 1 to 65535, got {args.port!r}")
    args.port = int(port)
    if not args.host.strip():
        _usage_error("--host must not be empty")
    try:
        import eventbus.dashboard  # noqa: F401, PLC0415 - Flask is optional: only this command needs it
    except ModuleNotFoundError as exc:
        if exc.name not in ("flask", "werkzeug", "jinja2"):
            raise
        _usage_error(f"the dashboard needs Flask: pip install 'eventbus[dashboard]' ({exc})")


# -- the commands ----------------------------------------------------------------------------


def _list(store: _Store, args: argparse.Namespace, output: _Output) -> int:
    letters = store.dead_letters()
    if args.json:
        output.print(
            _dumps([_dead_letter_json(letter, _undecodable(store, letter)) for letter in letters])
        )
    elif not letters:
        output.print("no dead letters")
    else:
        header = ("ID", "EVENT", "EVENT ID", "HANDLER", "ATTEMPTS", "REASON", "FAILED AT (UTC)")
        rows = [
            (
                letter.id,
                letter.event.name,
                letter.event.id,
                letter.handler,
                str(letter.attempts),
                letter.reason,
                _utc(letter.failed_at),
                letter.error,
            )
            for letter in letters
        ]
        output.print(_table((*header, "ERROR"), rows, wide=args.wide))
    return EXIT_OK


def _show(store: _Store, args: argparse.Namespace, output: _Output) -> int:
    letter = store.dead_letter(args.id)
    if letter is None:
        output.problem(f"no dead letter with id {args.id} in {args.where}")
        return EXIT_NOT_FOUND
    undecodable = _undecodable(store, letter)
    if args.json:
        output.print(_dumps(_dead_letter_json(letter, undecodable)))
    else:
        output.print(_dead_letter_text(letter, undecodable))
    return EXIT_OK


def _replay(store: _Store, args: argparse.Namespace, output: _Output) -> int:
    ids = [letter.id for letter in store.dead_letters()] if args.all else _unique(args.ids)
    replayed: list[str] = []
    missing: list[str] = []
    for letter_id in ids:
        letter = store.replay_dead_letter(letter_id)
        if letter is None:
            missing.append(letter_id)
            continue
        replayed.append(letter.id)
        if not args.json:
            output.print(f"replayed {letter.id}  {letter.event.name} -> {letter.handler}")
    if args.json:
        output.print(_dumps({"replayed": replayed, "not_found": missing}))
    elif replayed:
        output.print(f"{_count(len(replayed), 'dead letter')} replayed; {_REPLAY_HINT}")
    else:
        output.print("no dead letters replayed")
    return _report_missing(missing, len(replayed), "replayed", output)


def _purge(store: _Store, args: argparse.Namespace, output: _Output) -> int:
    purged = 0
    missing: list[str] = []
    if args.all:
        purged = store.purge_dead_letters()
    else:
        for letter_id in _unique(args.ids):
            if not store.purge_dead_letters([letter_id]):
                missing.append(letter_id)
                continue
            purged += 1
            if not args.json:
                output.print(f"purged {letter_id}")
    if args.json:
        output.print(_dumps({"purged": purged, "not_found": missing}))
    else:
        output.print(f"{_count(purged, 'dead letter')} purged")
    return _report_missing(missing, purged, "purged", output)


def _status(store: _Store, args: argparse.Namespace, output: _Output) -> int:
    found = store.status(args.event_id)
    if found is None:
        output.problem(f"no event with id {args.event_id} in {args.where}")
        return EXIT_NOT_FOUND
    deliveries = sorted(found.values(), key=lambda d: d.handler)
    if args.json:
        output.print(_dumps([_delivery_json(d) for d in deliveries]))
    else:
        rows = [(d.handler, d.state, str(d.attempts), d.error or "-") for d in deliveries]
        output.print(_table(("HANDLER", "STATE", "ATTEMPTS", "ERROR"), rows, wide=args.wide))
    return EXIT_OK


def _dashboard(store: _Store, args: argparse.Namespace, output: _Output) -> int:
    """Serve the dashboard of *store* until interrupted (Ctrl-C, SIGTERM as KeyboardInterrupt
    is not set up: the process just ends)."""
    from eventbus.dashboard import create_app  # noqa: PLC0415 - checked importable already

    app = create_app(store)
    try:
        server = make_server(
            args.host, args.port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        output.problem(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
        return EXIT_USAGE
    host, port = server.server_address[:2]
    output.print(f"eventbus dashboard of {args.where} on http://{_url_host(str(host))}:{port}/")
    output.out.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per request (the stores are thread-safe), ended with the process."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access log line on stderr per request."""

    def log_message(self, format: str, *args: Any) -> None:
        return


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _report_missing(missing: list[str], done: int, verb: str, output: _Output) -> int:
    """Name each id not found on stderr; ``EXIT_NOT_FOUND`` if there was any."""
    if not missing:
        return EXIT_OK
    for letter_id in missing:
        output.problem(f"no dead letter with id {letter_id}")
    output.problem(f"{_count(len(missing), 'id')} not found ({_count(done, 'dead letter')} {verb})")
    return EXIT_NOT_FOUND


# -- formatting ------------------------------------------------------------------------------


def _undecodable(store: _Store, letter: DeadLetter) -> _Undecodable | None:
    """Why *letter*'s stored event cannot be decoded, with its stored fields; ``None`` if it
    decodes (or is no longer stored)."""
    stored = store._stored_event(letter.event.id)
    if stored is None:
        return None
    try:
        from_envelope(store.codec, stored)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged row raises is shown, not raised
        return _Undecodable(str(exc), stored)
    return None


def _stored_fields(stored: Envelope) -> dict[str, Any]:
    """The stored text of an event's fields, each as a JSON value (text, or null)."""
    fields = stored._asdict()
    del fields["id"]
    return {name: _json_scalar(value) for name, value in fields.items()}


def _json_scalar(value: object) -> Any:
    """A column as SQLite returned it, as a JSON value: what is not text, a number or null
    (a blob written by hand) is shown by its ``repr``."""
    return value if value is None or isinstance(value, str | int | float) else repr(value)


def _dead_letter_json(letter: DeadLetter, undecodable: _Undecodable | None) -> dict[str, Any]:
    """Everything about *letter* as JSON values: full error, traceback and stored payload;
    for an event that cannot be decoded, also why and its stored fields."""
    event = letter.event
    payload_type, payload = _stored_form(event.payload)
    event_json: dict[str, Any] = {
        "id": event.id,
        "name": event.name,
        "occurred_at": event.occurred_at.isoformat(),
        "metadata": dict(event.metadata),
        "payload_type": payload_type,
        "payload": payload,
    }
    if undecodable is not None:
        event_json["undecodable"] = undecodable.why
        event_json["stored"] = _stored_fields(undecodable.stored)
    return {
        "id": letter.id,
        "handler": letter.handler,
        "attempts": letter.attempts,
        "reason": letter.reason,
        "error": letter.error,
        "traceback": letter.traceback,
        "failed_at": letter.failed_at.isoformat(),
        "event": event_json,
    }


#: How ``show`` labels the stored fields of an event that cannot be decoded.
_STORED_LABELS = {
    "name": "name",
    "payload_type": "payload type",
    "payload": "payload",
    "metadata": "metadata",
    "occurred_at": "occurred at",
}


def _dead_letter_text(letter: DeadLetter, undecodable: _Undecodable | None) -> str:
    event = letter.event
    payload_type, payload = _stored_form(event.payload)
    fields = [
        ("dead letter", letter.id),
        ("event", f"{event.name}  {event.id}"),
        ("occurred at", f"{_utc(event.occurred_at)} UTC"),
        ("metadata", json.dumps(dict(event.metadata))),
        ("handler", letter.handler),
        ("attempts", str(letter.attempts)),
        ("reason", letter.reason),
        ("failed at", f"{_utc(letter.failed_at)} UTC"),
        ("error", letter.error),
        ("payload type", payload_type or "(plain JSON)"),
    ]
    lines = [f"{name:<14}{value}" for name, value in fields]
    if undecodable is not None:
        lines += [f"{'undecodable':<14}{undecodable.why}", "stored"]
        lines += [
            f"  {_STORED_LABELS[name]:<14}{'(none)' if value is None else value}"
            for name, value in _stored_fields(undecodable.stored).items()
        ]
    lines += ["payload", _indent(_dumps(payload))]
    lines += ["traceback", _indent(letter.traceback or "(none recorded)")]
    return "\n".join(lines)


def _delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {
        "handler": delivery.handler,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "error": delivery.error,
    }


def _stored_form(payload: object) -> tuple[str | None, Any]:
    """(type name, JSON value) of a payload read through :class:`_StoredFormCodec`. The store
    gives ``None`` in place of a payload it could not read (stored text that is not JSON)."""
    if isinstance(payload, StoredPayload):
        return payload.type_name, payload.value
    return None, None


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], *, wide: bool) -> str:
    """Left-aligned columns two spaces apart, every cell on one line. Unless *wide*, the last
    column is cut to what is left of the terminal's width (``COLUMNS`` if set), but to no
    less than MIN_ERROR_WIDTH."""
    table = [[_one_line(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    room = max(shutil.get_terminal_size().columns - sum(w + 2 for w in widths), MIN_ERROR_WIDTH)
    lines = []
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        last = row[-1] if wide else _shorten(row[-1], room)
        lines.append("  ".join([*cells, last]).rstrip())
    return "\n".join(lines)


def _one_line(value: object) -> str:
    """*value* as text on one line: runs of whitespace (newlines too) become one space."""
    return " ".join(str(value).split())


def _shorten(line: str, width: int) -> str:
    """*line* cut to *width* characters with a trailing ``...`` if longer."""
    return line if len(line) <= width else line[: width - 3] + "..."


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _unique(ids: Sequence[str]) -> list[str]:
    """*ids* without repeats, in the order given."""
    return list(dict.fromkeys(ids))
