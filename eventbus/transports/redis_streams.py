"""RedisStreamsTransport: the event flow of several processes through one Redis stream.

The only module that imports ``redis``. Thread-safe: ``publish`` may be called from any thread;
one reader thread per transport consumes the group.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, cast

import redis

from eventbus._envelope import Envelope, from_envelope, to_envelope
from eventbus._event import Event, new_id
from eventbus._registry import handler_name
from eventbus.codec import JsonCodec
from eventbus.exceptions import DuplicateInFlightError, TransportError
from eventbus.typing import HandlerT

__all__ = ["RedisStreamsTransport"]

#: Called for each entry read: the event, and the entry id to pass to ``settled()``.
Deliver = Callable[[Event, str], None]

_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)


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

    Connection loss: ``publish`` (so ``emit``) raises :class:`~eventbus.TransportError`; it
    never drops an event silently. When Redis was unreachable nothing was appended; when the
    connection broke after the command was sent, the entry may have been appended anyway
    (Redis ran it, the reply was lost), so a caller that publishes again may publish twice,
    which consumers tolerate as they tolerate any redelivery. The reader reconnects with
    backoff (0.1 s doubling to 5 s) and resumes; entries it held stay pending.
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
    ) -> None:
        for what, value in (("stream", stream), ("group", group)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{what} must be a non-empty str, got {value!r}")
        if claim_idle <= 0 or block <= 0:
            raise ValueError("claim_idle and block must be > 0")
        if max_deliveries < 1 or batch < 1:
            raise ValueError("max_deliveries and batch must be at least 1")
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{new_id()}"
        self.dead_stream = dead_stream or f"{stream}:dead"
        self.codec = codec if codec is not None else JsonCodec()
        self.claim_idle = claim_idle
        self.max_deliveries = max_deliveries
        self.done_ttl = int(done_ttl)
        self._batch = batch
        self._block = block
        self._trim = trim
        # Typed as Any: redis-py's command methods return "Awaitable[T] | T" unions shared
        # with its asyncio client, which would need a cast at every call.
        self._redis: Any = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=None)
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

    # -- producing -----------------------------------------------------------------------

    def publish(self, event: Event) -> str:
        """Append *event* to the stream; return the entry id. Raises ``TypeError`` for a
        payload the codec cannot encode (nothing appended) and
        :class:`~eventbus.TransportError` when Redis cannot be reached or the connection broke
        (appended only if Redis ran the command before the break: see the class docs)."""
        fields = self._encode(event)
        try:
            self._ensure_group()
            entry_id = self._redis.xadd(self.stream, fields)
        except _CONNECTION_ERRORS as exc:
            raise TransportError(
                f"could not publish {event.name!r} to Redis stream {self.stream!r}: {exc}"
            ) from exc
        return _text(entry_id)

    def _encode(self, event: Event) -> dict[str, str]:
        envelope = to_envelope(self.codec, event)
        # A stream entry's fields are strings: plain JSON's missing type name is "".
        return {**envelope._asdict(), "payload_type": envelope.payload_type or ""}

    def _decode(self, fields: Mapping[str, str]) -> Event:
        return from_envelope(
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

    # -- consuming -----------------------------------------------------------------------

    def start(self, deliver: Deliver) -> int:
        """Create the group if needed, take over entries of stopped consumers, and start the
        reader thread, which hands each entry to *deliver*. Returns how many entries were
        taken over. Raises :class:`~eventbus.TransportError` if Redis cannot be reached and
        ``RuntimeError`` if already started."""
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
            raise TransportError(f"could not reach Redis at {self.url}: {exc}") from exc
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
        """Acknowledge an entry whose local deliveries have all settled."""
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
        response = self._redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=self._batch,
            block=int(self._block * 1000),
        )
        for _stream, entries in response or []:
            with self._lock:  # all of them held from now on, not only the one being handed
                self._in_flight.update(_text(entry_id) for entry_id, _ in entries)
            for entry_id, raw in entries:
                self._hand_over(_text(entry_id), _fields(raw))

    def _hand_over(self, entry_id: str, fields: Mapping[str, str]) -> None:
        """Decode an entry this consumer already holds (in ``_in_flight``) and deliver it."""
        try:
            event = self._decode(fields)
        except Exception as exc:  # noqa: BLE001 - quarantined, the stream goes on
            self._dead_letter(entry_id, fields, f"cannot decode: {type(exc).__name__}: {exc}")
            return
        deliver = self._deliver
        assert deliver is not None
        deliver(event, entry_id)

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
            for entry in entries:
                entry_id, raw = _text(entry[0]), entry[1]
                if entry_id in mine:
                    continue
                fields = _fields(raw)
                deliveries = counts.get(entry_id, 1)
                if deliveries > self.max_deliveries:
                    self._dead_letter(entry_id, fields, f"delivered {deliveries} times", deliveries)
                    continue
                self._hand_over(entry_id, fields)
                handed += 1
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
        self, entry_id: str, fields: Mapping[str, str], reason: str, deliveries: int = 1
    ) -> None:
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
        self.on_dead(entry_id, history, reason)

    def trim(self) -> int:
        """Delete entries every group has acknowledged; return how many were deleted.

        The cut is ``XTRIM MINID`` at the oldest entry that is still pending in some group or
        not yet delivered to it, so nothing a group still needs is deleted."""
        groups = self._redis.xinfo_groups(self.stream)
        if not groups:
            return 0
        keep_from: list[str] = []
        for info in groups:
            name = _text(info["name"])
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


def _fields(raw: Mapping[Any, Any] | None) -> dict[str, str]:
    """An entry's fields as text (redis-py hands them over as bytes)."""
    return {_text(k): _text(v) for k, v in (raw or {}).items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
