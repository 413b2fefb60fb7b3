"""RedisStreamsTransport: the event flow of several processes through one Redis stream.

The only module that imports ``redis`` (the shared rate limiter of ``_redis_rate`` is handed
its client). Thread-safe: ``publish``, ``ping`` and ``rate_limiter`` may be called from any
thread; one reader thread per transport consumes the group.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from eventbus._envelope import Envelope, from_envelope, to_envelope
from eventbus._event import Event, new_id
from eventbus._registry import handler_name
from eventbus.codec import JsonCodec
from eventbus.exceptions import CodecError, DuplicateInFlightError, TransportError
from eventbus.transports._redis_rate import RedisRateLimiter, validate_rate
from eventbus.transports._urls import without_password
from eventbus.typing import HandlerT, RateLimiter, Reporter

__all__ = ["RedisStreamsTransport"]

#: Called for each entry read: the event, the entry id to pass to ``settled()`` and, for an
#: entry published with ``not_before``, that time as a third argument (only then: a callback
#: taking two arguments works for every entry without one).
Deliver = Callable[..., None]

_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)

#: The fields an entry must have to be decoded (``payload_type`` and ``metadata`` may be absent).
_REQUIRED_FIELDS = ("id", "name", "payload", "occurred_at")
#: The field of an entry published with ``not_before``: wall-clock seconds since the epoch.
_NOT_BEFORE_FIELD = "not_before"

#: Characters of one field, and of a reason, handed to ``on_dead`` (which the bus logs).
_LOGGED_FIELD_LIMIT = 200
_LOGGED_REASON_LIMIT = 1000


class RedisStreamsTransport:
    """Events appended to a Redis stream with ``XADD``; each bus reads its consumer group.

    Within one group every entry is handled by one consumer (competing consumers); every
    group gets every entry (one group per service is fan-out across services). An entry is
    acknowledged (``XACK``) once all of its local deliveries have settled, succeeded or dead.
    Entries of a consumer that stopped (no ``XACK`` within ``claim_idle`` seconds) are taken
    over by the others with ``XAUTOCLAIM``; a live consumer keeps its in-flight entries fresh,
    so a slow handler or a long backoff is not taken from it. An entry delivered more than
    ``max_deliveries`` times goes to the dead-letter stream ``dead_stream`` (default
    ``"<stream>:dead"``) with its delivery history, instead of looping.

    An entry that cannot be decoded (fields that are not UTF-8, a missing field, bad JSON, an
    invalid event name, metadata that is not an object of strings, a timestamp without a time
    zone: anything the event decoding refuses) goes to the dead-letter stream at once, whether
    read or taken over, and is acknowledged; the rest of its batch is delivered. Its fields
    are kept as they were, bytes that are not UTF-8 written as backslash escapes (``\\xff``),
    with a ``reason`` naming the error (``cannot decode: CodecError: ...``). ``on_dead`` (so
    the bus's ``stream.dead_lettered`` record) gets the fields and the reason made safe for a
    log line: cut to a few hundred characters, and written as a Python literal
    (``'a:b\\n...'``) unless every character is printable. If handing one entry over fails
    otherwise, the error goes to ``on_error``, the rest of the batch is delivered, and that
    entry is left pending, to be taken over after ``claim_idle`` like a stopped consumer's.

    Options:

    * ``consumer``: this process's name in the group; default ``host:pid:unique``.
    * ``claim_idle``: seconds an entry may sit unacknowledged with a consumer before another
      takes it over (default 30).
    * ``max_deliveries``: deliveries of one entry before it is dead-lettered (default 5).
    * ``batch``: entries read per ``XREADGROUP`` call; ``block``: seconds one call waits.
    * ``trim``: trim acknowledged entries (default on). Trimming never deletes an entry that
      some group has not read or has not acknowledged: the stream is cut with ``XTRIM MINID``
      below the oldest entry still pending in, or not yet delivered to, any group. The group
      is created (reading from the start of the stream) by the first producer or consumer
      that names it, so a worker that starts after the API still gets every event the API
      published; a group that nobody named before entries were trimmed does not see them.
    * ``codec``: how payloads become JSON, the same as the durable store's.
    * ``done_ttl``: how long :meth:`once` remembers that a handler succeeded for an event.
    * ``socket_timeout``: seconds (default 5, a finite number > 0) that a command waits to
      connect and, again, for Redis's reply. It bounds ``publish``, :meth:`ping`,
      acknowledgements and upkeep: against a Redis that does not answer (hung, paused,
      swapped out) each gives up within ``2 * socket_timeout``. Commands are not retried
      inside the client, which would multiply that bound and could append a timed-out entry
      twice. The reader's ``XREADGROUP`` waits ``block`` seconds on purpose, so its
      connection allows ``block + socket_timeout`` for the reply.

    Delayed events: ``publish(event, not_before=t)`` adds a field ``not_before`` (wall-clock
    seconds since the epoch) to the entry, and the consumer hands it over as
    ``deliver(event, entry_id, t)``; the bus holds the entry, unacknowledged and kept fresh,
    until then. A consumer that dies meanwhile leaves it pending: whoever takes it over reads
    ``not_before`` again, so the delay survives. An entry whose ``not_before`` is not a finite
    number cannot be decoded (dead stream, as above).

    Shared rate limits: :meth:`rate_limiter` gives a token bucket in Redis that every consumer
    of the group shares, so a handler's ``rate_limit`` holds across processes.

    Connection loss: ``publish`` (so ``emit``) raises :class:`~eventbus.TransportError`; it
    never drops an event silently. When Redis was unreachable nothing was appended; when the
    connection broke or timed out after the command was sent, the entry may have been appended
    anyway (Redis ran it, or runs it once it answers again; the reply was lost), so a caller
    that publishes again may publish twice, which consumers tolerate as they tolerate any
    redelivery. The reader reports the error through ``on_error`` (the bus logs
    ``eventbus.internal_error``), reconnects with backoff (0.1 s doubling to 5 s) and resumes;
    entries it held stay pending. :meth:`ping` tells whether Redis answers now, for a health
    check.
    """

    def __init__(
        self,
        url: str,
        *,
        stream: str = "eventbus",
        group: str = "eventbus",
        consumer: str | None = None,
        claim_idle: float = 30.0,
        max_deliveries: int = 5,
        dead_stream: str | None = None,
        batch: int = 100,
        block: float = 1.0,
        trim: bool = True,
        codec: JsonCodec | None = None,
        done_ttl: float = 7 * 24 * 3600,
        socket_timeout: float = 5.0,
    ) -> None:
        for what, value in (("stream", stream), ("group", group)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{what} must be a non-empty str, got {value!r}")
        if claim_idle <= 0 or block <= 0:
            raise ValueError("claim_idle and block must be > 0")
        if max_deliveries < 1 or batch < 1:
            raise ValueError("max_deliveries and batch must be at least 1")
        if (
            isinstance(socket_timeout, bool)
            or not isinstance(socket_timeout, int | float)
            or not (math.isfinite(socket_timeout) and socket_timeout > 0)
        ):
            raise ValueError(
                f"socket_timeout must be a finite number of seconds > 0, got {socket_timeout!r}"
            )
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{new_id()}"
        self.dead_stream = dead_stream or f"{stream}:dead"
        self.codec = codec if codec is not None else JsonCodec()
        self.claim_idle = claim_idle
        self.max_deliveries = max_deliveries
        self.done_ttl = int(done_ttl)
        self.socket_timeout = float(socket_timeout)
        self._batch = batch
        self._block = block
        self._trim = trim
        # Credentials left out of error messages, which may end up in logs or a health page.
        self._where = without_password(url)
        # Typed as Any: redis-py's command methods return "Awaitable[T] | T" unions shared
        # with its asyncio client, which would need a cast at every call.
        self._redis: Any = self._client(self.socket_timeout)
        # The reader's own client: its XREADGROUP blocks for up to ``block`` by design, so only
        # a reply later than that means Redis is not answering.
        self._reader_redis: Any = self._client(block + self.socket_timeout)
        self._deliver: Deliver | None = None
        self._reader: threading.Thread | None = None
        self._refresher: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._group_ready = False
        #: Called with errors of the reader thread (lost connections included); the bus sets
        #: it to log them.
        self.on_error: Callable[[BaseException], None] = lambda exc: None
        #: Called when an entry is moved to the dead-letter stream (its fields, id, reason).
        self.on_dead: Callable[[str, Mapping[str, str], str], None] = lambda *args: None
        #: Called with how many entries of stopped consumers this one took over (when > 0).
        self.on_taken_over: Callable[[int], None] = lambda count: None

    def _client(self, timeout: float) -> Any:
        # No retries inside redis-py: its retries would stretch every bound documented in terms
        # of socket_timeout, and a retried XADD that had only timed out appends the event again.
        # A failed command raises instead: to publish()'s caller, or into the reader's backoff.
        return redis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.socket_timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    # -- producing -----------------------------------------------------------------------

    def publish(self, event: Event, *, not_before: float | None = None) -> str:
        """Append *event* to the stream; return the entry id. Thread-safe. Blocks for at most
        ``2 * socket_timeout`` (connecting, then the reply) when Redis does not answer.

        *not_before* (wall-clock seconds since the epoch, a finite number) is written with the
        entry, and the consumer that reads it, or takes it over, passes it to its ``deliver``.

        Raises ``ValueError`` for a *not_before* that is not a finite number and ``TypeError``
        for a payload the codec cannot encode (nothing appended in either case), and
        :class:`~eventbus.TransportError` when Redis cannot be reached, the connection broke or
        Redis did not answer within ``socket_timeout`` (appended only if Redis ran, or later
        runs, the command: see the class docs)."""
        due = None if not_before is None else _checked_not_before(not_before)
        fields = self._encode(event)
        if due is not None:
            fields[_NOT_BEFORE_FIELD] = repr(due)
        try:
            self._ensure_group()
            entry_id = self._redis.xadd(self.stream, fields)
        except _CONNECTION_ERRORS as exc:
            raise TransportError(
                f"could not publish {event.name!r} to Redis stream {self.stream!r}: {exc}"
            ) from exc
        return _text(entry_id)

    def ping(self) -> None:
        """Return if Redis answers one ``PING`` (on the producer's connections) within
        ``socket_timeout``; raise :class:`~eventbus.TransportError` if it does not, or
        answers with an error. Thread-safe. Blocks for at most ``2 * socket_timeout``
        (connecting, then the reply). Meant for health checks."""
        try:
            self._redis.ping()
        except _CONNECTION_ERRORS as exc:
            raise TransportError(
                f"Redis at {self._where} did not answer PING within {self.socket_timeout:g} s: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        except redis.RedisError as exc:  # an error reply (say, NOAUTH): not healthy either
            raise TransportError(
                f"Redis at {self._where} answered PING with an error: {type(exc).__name__}: {exc}"
            ) from exc

    def rate_limiter(self, name: str, limit: int, period: float) -> RateLimiter:
        """A token bucket for handler *name* shared by every consumer of this transport's
        group: at most *limit* attempts start per *period* seconds across all of them (a burst
        of up to *limit*, then *limit* per *period*). The bus asks for one per rate-limited
        handler. Thread-safe.

        The bucket is a hash ``<stream>:rate:<group>:<name>`` updated by one Lua script on the
        server's clock, so the processes' clocks do not matter; an idle bucket expires once it
        would be full again. ``acquire()`` returns ``0.0`` for a token taken, else the seconds
        until the next, and raises :class:`~eventbus.TransportError` when Redis cannot be
        reached or answers with an error (within ``2 * socket_timeout``).

        Raises ``ValueError`` (``TypeError`` for a *limit* that is not an int) for an empty
        *name*, a *limit* below 1 or a *period* that is not a finite number > 0."""
        name, limit, period = validate_rate(name, limit, period)
        return RedisRateLimiter(
            self._redis,
            f"{self.stream}:rate:{self.group}:{name}",
            limit,
            period,
            errors=(redis.RedisError,),
            where=self._where,
        )

    def _encode(self, event: Event) -> dict[str, str]:
        envelope = to_envelope(self.codec, event)
        # A stream entry's fields are strings: plain JSON's missing type name is "".
        return {**envelope._asdict(), "payload_type": envelope.payload_type or ""}

    def _decode(self, raw: Mapping[Any, Any] | None) -> Event:
        """The event of an entry's fields as Redis hands them over (bytes). Raises
        ``CodecError`` (a ``ValueError``) for fields that are not UTF-8, a missing field, or
        anything :func:`from_envelope` refuses."""
        return self._decode_entry(raw)[0]

    def _decode_entry(self, raw: Mapping[Any, Any] | None) -> tuple[Event, float | None]:
        """The event of an entry's fields and its ``not_before`` (``None`` without one).
        Raises ``CodecError`` as :meth:`_decode` does, and for a ``not_before`` that is not a
        finite number."""
        fields = _utf8_fields(raw)
        missing = [repr(name) for name in _REQUIRED_FIELDS if name not in fields]
        if missing:
            raise CodecError(
                f"entry has no {', '.join(missing)} field{'s' if len(missing) > 1 else ''}"
            )
        not_before = _parse_not_before(fields.get(_NOT_BEFORE_FIELD))
        event = from_envelope(
            self.codec,
            Envelope(
                id=fields["id"],
                name=fields["name"],
                payload_type=fields.get("payload_type") or None,
                payload=fields["payload"],
                metadata=fields.get("metadata") or "{}",
                occurred_at=fields["occurred_at"],
            ),
        )
        return event, not_before

    # -- consuming -----------------------------------------------------------------------

    def start(self, deliver: Deliver, reporter: Reporter | None = None) -> int:
        """Create the group if needed, take over entries of stopped consumers, and start the
        reader thread, which hands each entry to *deliver*: ``deliver(event, entry_id)``, or
        ``deliver(event, entry_id, not_before)`` for an entry published with ``not_before``
        (hold it, unsettled, until then). Returns how many entries were taken over. The
        reader's errors, dead-lettered entries and take-overs go to *reporter* when given
        (else to ``on_error``, ``on_dead`` and ``on_taken_over``).
        Raises :class:`~eventbus.TransportError` if Redis cannot be reached and
        ``RuntimeError`` if already started."""
        if reporter is not None:
            self._report_to(reporter)
        with self._lock:
            if self._deliver is not None:
                raise RuntimeError("this transport is already consuming")
            self._deliver = deliver
        try:
            self._ensure_group()
            taken = self._reclaim()
            if taken:
                self.on_taken_over(taken)
        except _CONNECTION_ERRORS as exc:
            raise TransportError(f"could not reach Redis at {self._where}: {exc}") from exc
        self._stop.clear()
        self._reader = threading.Thread(
            target=self._read_forever, name=f"eventbus-redis-{self.stream}", daemon=True
        )
        # A thread of its own: the reader blocks while the bus is full (backpressure), and
        # the entries it holds must stay fresh meanwhile or another consumer would take them.
        self._refresher = threading.Thread(
            target=self._refresh_forever, name=f"eventbus-redis-{self.stream}-fresh", daemon=True
        )
        self._reader.start()
        self._refresher.start()
        return taken

    def settled(self, entry_id: str) -> None:
        """Acknowledge an entry whose local deliveries have all settled. Thread-safe; blocks
        for at most ``2 * socket_timeout``; a failure is reported through ``on_error`` (the
        entry then stays pending and is delivered again), never raised."""
        with self._lock:
            self._in_flight.discard(entry_id)
        try:
            self._redis.xack(self.stream, self.group, entry_id)
        except _CONNECTION_ERRORS as exc:
            # Not acknowledged: it stays pending and is delivered again (at least once).
            self.on_error(exc)

    def close(self) -> None:
        """Stop reading; entries read but not settled stay pending for another consumer (or
        this one, when it comes back). Idempotent."""
        self._stop.set()
        for thread in (self._reader, self._refresher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(self._block + 5)
        self._reader = self._refresher = None
        self._redis.close()
        self._reader_redis.close()

    def _report_to(self, reporter: Reporter) -> None:
        # The reporter comes first; a hook the application set itself still runs after it.
        on_error, on_dead, on_taken_over = self.on_error, self.on_dead, self.on_taken_over

        def error(exc: BaseException) -> None:
            reporter.internal_error("transport", exc)
            on_error(exc)

        def dead(entry_id: str, fields: Mapping[str, str], reason: str) -> None:
            reporter.stream_dead_lettered(entry_id, fields, reason)
            on_dead(entry_id, fields, reason)

        def taken_over(count: int) -> None:
            reporter.stream_taken_over(count)
            on_taken_over(count)

        self.on_error, self.on_dead, self.on_taken_over = error, dead, taken_over

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _refresh_forever(self) -> None:
        # Event.wait, not sleep: close() ends the wait at once.
        while not self._stop.wait(self.claim_idle / 3):
            try:
                self._keep_fresh()
            except Exception as exc:  # noqa: BLE001 - reported; the next round tries again
                self.on_error(exc)

    def _read_forever(self) -> None:
        failures = 0
        next_upkeep = time.monotonic() + self.claim_idle / 3
        while not self._stop.is_set():
            try:
                self._ensure_group()
                if time.monotonic() >= next_upkeep:
                    next_upkeep = time.monotonic() + self.claim_idle / 3
                    taken = self._reclaim()
                    if taken:
                        self.on_taken_over(taken)
                    if self._trim:
                        self.trim()
                self._read_once()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - reported; reconnect and go on
                if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                    # Redis came back without its data (no persistence): make the group again.
                    self._group_ready = False
                self.on_error(exc)
                failures += 1
                # Event.wait, not sleep: close() ends the wait at once.
                self._stop.wait(min(5.0, 0.1 * 2 ** min(failures - 1, 6)))

    def _read_once(self) -> None:
        response = self._reader_redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=self._batch,
            block=int(self._block * 1000),
        )
        for _stream, entries in response or []:
            held = [(_text(entry_id), raw, 1) for entry_id, raw in entries]
            with self._lock:  # all of them held from now on, not only the one being handed
                self._in_flight.update(entry_id for entry_id, _raw, _n in held)
            self._hand_over_all(held)

    def _hand_over_all(self, entries: list[tuple[str, Any, int]]) -> int:
        """Hand over each (entry id, raw fields, deliveries) this consumer holds (in
        ``_in_flight``); return how many reached ``deliver``.

        One entry's failure (``deliver`` raised, dead-lettering failed) is reported through
        ``on_error`` and that entry released, the rest go on. A lost connection releases the
        rest too and raises, into the caller's handling of lost connections."""
        delivered = 0
        for index, (entry_id, raw, deliveries) in enumerate(entries):
            try:
                if self._hand_over(entry_id, raw, deliveries):
                    delivered += 1
            except _CONNECTION_ERRORS:
                self._release(held for held, _raw, _n in entries[index:])
                raise
            except Exception as exc:  # noqa: BLE001 - reported; the rest of the batch goes on
                self._release([entry_id])
                self.on_error(exc)
        return delivered

    def _hand_over(self, entry_id: str, raw: Mapping[Any, Any] | None, deliveries: int) -> bool:
        """Deliver an entry this consumer holds, or move it to the dead stream if it was
        delivered too often or cannot be decoded. Returns whether it was delivered."""
        if deliveries > self.max_deliveries:
            reason = f"delivered {deliveries} times"
            self._dead_letter(entry_id, _lenient_fields(raw), reason, deliveries)
            return False
        try:
            event, not_before = self._decode_entry(raw)
        except Exception as exc:  # noqa: BLE001 - quarantined, the stream goes on
            reason = f"cannot decode: {type(exc).__name__}: {exc}"
            self._dead_letter(entry_id, _lenient_fields(raw), reason, deliveries)
            return False
        deliver = self._deliver
        assert deliver is not None
        if not_before is None:
            deliver(event, entry_id)
        else:
            deliver(event, entry_id, not_before)
        return True

    def _release(self, entry_ids: Iterable[str]) -> None:
        # No longer kept fresh: once idle for claim_idle the entries are taken over (by this
        # consumer or another), which counts a delivery, so one that always fails ends up in
        # the dead stream instead of being held, unread, for ever.
        with self._lock:
            self._in_flight.difference_update(entry_ids)

    # -- upkeep: take over, keep fresh, dead-letter, trim ----------------------------------

    def _keep_fresh(self) -> None:
        # Reset the idle time of entries this consumer is still working on (a slow handler,
        # a long backoff), so that others do not take them over. JUSTID: no delivery counted.
        with self._lock:
            ids = list(self._in_flight)
        if ids:
            self._redis.xclaim(self.stream, self.group, self.consumer, 0, ids, justid=True)

    def _reclaim(self) -> int:
        """Take over entries idle for ``claim_idle`` (their consumer stopped); dead-letter
        those delivered more than ``max_deliveries`` times. Returns how many were handed on."""
        idle_ms = int(self.claim_idle * 1000)
        start = "0-0"
        handed = 0
        while True:
            reply = self._redis.xautoclaim(
                self.stream, self.group, self.consumer, idle_ms, start, count=self._batch
            )
            start, entries = _text(reply[0]), [e for e in reply[1] if e]
            ids = [_text(e[0]) for e in entries]
            counts = self._delivery_counts(ids)
            with self._lock:
                # Our own entries still being worked on (idle only if refreshing failed) are
                # not handed over twice; the rest are held from now on.
                mine = self._in_flight.intersection(ids)
                self._in_flight.update(ids)
            handed += self._hand_over_all(
                [
                    (entry_id, entry[1], counts.get(entry_id, 1))
                    for entry_id, entry in zip(ids, entries, strict=True)
                    if entry_id not in mine
                ]
            )
            if start == "0-0":
                return handed

    def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        # One exact XPENDING per entry (pipelined): a range query over the claimed ids would
        # also return, and be cut short by, this consumer's other pending entries.
        if not ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        counts: dict[str, int] = {}
        for rows in pipe.execute():
            for row in rows:
                counts[_text(row["message_id"])] = int(row["times_delivered"])
        return counts

    def _dead_letter(
        self, entry_id: str, fields: Mapping[str, str], reason: str, deliveries: int
    ) -> None:
        """Move a held entry to the dead stream and acknowledge it (one transaction), then
        tell ``on_dead``, with the fields and reason made safe for a log line."""
        history = {
            **fields,
            "entry_id": entry_id,
            "group": self.group,
            "consumer": self.consumer,
            "deliveries": str(deliveries),
            "reason": reason,
            "dead_at": datetime.now().astimezone().isoformat(),
        }
        pipe = self._redis.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, history)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        with self._lock:
            self._in_flight.discard(entry_id)
        loggable = {
            _loggable(key, _LOGGED_FIELD_LIMIT): _loggable(value, _LOGGED_FIELD_LIMIT)
            for key, value in history.items()
        }
        self.on_dead(entry_id, loggable, _loggable(reason, _LOGGED_REASON_LIMIT))

    def trim(self) -> int:
        """Delete entries every group has acknowledged; return how many were deleted.

        The cut is ``XTRIM MINID`` at the oldest entry that is still pending in some group or
        not yet delivered to it, so nothing a group still needs is deleted."""
        groups = self._redis.xinfo_groups(self.stream)
        if not groups:
            return 0
        keep_from: list[str] = []
        for info in groups:
            name = info["name"]  # as Redis has it: a name that is not UTF-8 still works
            keep_from.append(_text(info["last-delivered-id"]))
            if int(info["pending"]):
                summary = self._redis.xpending(self.stream, name)
                if summary["min"] is not None:  # acknowledged since XINFO GROUPS was read
                    keep_from.append(_text(summary["min"]))
        minid = min(keep_from, key=_id_key)
        if minid == "0-0":
            return 0
        return int(self._redis.xtrim(self.stream, minid=minid, approximate=False))

    # -- idempotent handlers -------------------------------------------------------------

    def once(self, handler: HandlerT) -> HandlerT:
        """Decorator: run *handler* to success at most once per event id, across
        redeliveries and processes (for ``ttl`` seconds, 7 days; see :meth:`__init__`).

        At-least-once delivery means an event can arrive twice (a consumer died after its
        handler ran, before the acknowledgement). This records each success in Redis under
        ``<stream>:done:<handler>:<event id>`` and skips events already recorded. While one
        consumer runs the handler it holds ``...:running:...`` for ``claim_idle`` seconds, and
        another consumer given the same event meanwhile raises
        :class:`~eventbus.DuplicateInFlightError`, which the bus retries later, by when the
        first has recorded its success. If the first consumer died, its hold expires after
        ``claim_idle``: give such handlers a retry policy whose backoff outlasts it, or the
        retries may run out first (the event then becomes a dead letter, not lost). The wrapper
        keeps the handler's name, so ``off()`` and dead letters still refer to it.

        A handler whose effect lives in a database is better made idempotent there (insert
        keyed by ``event.id``, ``ON CONFLICT DO NOTHING``), in the same transaction as the
        effect: then no crash between effect and record can let it run twice.
        """
        name = handler_name(handler)
        prefix = f"{self.stream}:{{}}:{name}:"
        done_prefix, running_prefix = prefix.format("done"), prefix.format("running")
        lease_ms = int(self.claim_idle * 1000)

        @functools.wraps(handler)
        def run_once(event: Event) -> object:
            done_key = done_prefix + event.id
            if self._redis.exists(done_key):
                return None
            running_key = running_prefix + event.id
            if not self._redis.set(running_key, self.consumer, nx=True, px=lease_ms):
                raise DuplicateInFlightError(f"{name} is running {event.id} in another consumer")
            try:
                result = handler(event)
                self._redis.set(done_key, "1", ex=self.done_ttl)
            finally:
                self._redis.delete(running_key)
            return result

        return cast(HandlerT, run_once)

    def __repr__(self) -> str:
        return f"<RedisStreamsTransport {self.stream!r} group={self.group!r}>"


def _checked_not_before(value: object) -> float:
    """*value*, publish()'s ``not_before``, as a float; ``ValueError`` unless it is a finite
    number of seconds (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not_before must be a number of seconds since the epoch, got {value!r}")
    try:
        due = float(value)
    except OverflowError:  # an int too large for a float
        due = math.inf
    if not math.isfinite(due):
        raise ValueError(f"not_before must be a finite number of seconds, got {value!r}")
    return due


def _parse_not_before(text: str | None) -> float | None:
    """An entry's ``not_before`` field as a float, ``None`` without one; ``CodecError``
    unless it is a finite number."""
    if text is None:
        return None
    try:
        due = float(text)
    except ValueError:
        due = math.nan
    if not math.isfinite(due):
        raise CodecError(f"not_before is not a finite number of seconds: {text[:40]!r}")
    return due


def _utf8_fields(raw: Mapping[Any, Any] | None) -> dict[str, str]:
    """An entry's fields as text (redis-py hands them over as bytes). Raises ``CodecError``
    naming the first field that is not UTF-8."""
    fields: dict[str, str] = {}
    for key, value in (raw or {}).items():
        name = _utf8(key, f"field name {_lenient(key)!r}")
        fields[name] = _utf8(value, f"field {name!r}")
    return fields


def _utf8(value: Any, what: str) -> str:
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CodecError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from exc


def _lenient_fields(raw: Mapping[Any, Any] | None) -> dict[str, str]:
    """An entry's fields as text whatever their bytes: what is not UTF-8 becomes backslash
    escapes (``\\xff``), so that a dead-letter record keeps all that can be kept."""
    return {_lenient(key): _lenient(value) for key, value in (raw or {}).items()}


def _lenient(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _loggable(text: str, limit: int) -> str:
    """*text* fit for one field of a log record: cut to *limit* characters, and written as a
    Python literal (quotes, backslash escapes) unless every character is printable, so that
    text read from the stream cannot forge log lines or send terminal escape sequences."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return text if text.isprintable() else repr(text)


def _text(value: Any) -> str:
    """An entry id, or other text Redis itself made, as ``str`` (always ASCII)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
