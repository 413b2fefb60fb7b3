"""RabbitMQTransport: the event flow of several processes through a RabbitMQ topic exchange.

The only module that imports ``pika`` (the ``rabbitmq`` extra). pika's connections are not
thread-safe, so each lives on one thread: publishing uses a connection of its own under a lock,
and one consumer thread owns the consuming connection; acknowledgements from the bus's workers
reach it through ``add_callback_threadsafe``, pika's one thread-safe call.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from eventbus._envelope import Envelope, from_envelope, to_envelope
from eventbus._event import Event
from eventbus.codec import JsonCodec
from eventbus.exceptions import TransportError
from eventbus.transports._urls import without_password
from eventbus.typing import Reporter

__all__ = ["RabbitMQTransport", "binding_key", "routing_key"]

#: Called for each message received: the event, the token to pass to ``settled()`` and, for a
#: message published with ``not_before``, that time as a third argument (only then).
Deliver = Callable[..., None]

#: The header of a message published with ``not_before``: wall-clock seconds since the epoch.
_NOT_BEFORE = "x-eventbus-not-before"
#: The header a dead-lettered message gets from this transport: why.
_REASON = "x-eventbus-reason"
#: Backoff of the consumer's reconnects (seconds); the last one repeats.
_RECONNECT = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: What a broker out of reach, or a connection that broke, raises in pika (a connector error,
#: such as a broker that accepts TCP and never answers, is not an AMQPError).
_BROKEN = (pika.exceptions.AMQPError, AMQPConnectorException, OSError)

#: Characters of a field or reason handed to the reporter (which the bus logs).
_LOGGED_LIMIT = 200


def routing_key(name: str) -> str:
    """The AMQP routing key of event *name*: its ``:``-separated segments become words
    separated by ``.``; a ``.`` inside a segment (``invoice.paid``) is written ``%``, a
    character event names never contain, so that a segment stays one word."""
    return ".".join(segment.replace(".", "%") for segment in name.split(":"))


def binding_key(pattern: str) -> str:
    """The binding key of a subscription *pattern*: ``*`` stays ``*`` (one word), ``**``
    becomes ``#`` (zero or more words: a superset of "one or more", and the bus matches
    every event it receives against its subscriptions again)."""
    return ".".join(
        "#" if segment == "**" else "*" if segment == "*" else segment.replace(".", "%")
        for segment in pattern.split(":")
    )


class RabbitMQTransport:
    """Events published to a durable topic exchange; each group consumes one durable queue.

    ``RabbitMQTransport("amqp://guest:guest@localhost:5672/", exchange="orders",
    group="email")``. The exchange (``exchange``, type ``topic``) gets each event with the
    routing key made from its name (:func:`routing_key`). Each ``group`` is one durable quorum
    queue, ``<exchange>.<group>``, bound for the names and patterns its bus's handlers
    subscribe to (``*`` and ``**`` map to AMQP's ``*`` and ``#``): competing consumers within a
    group, fan-out across groups. An event no group is bound for is kept in
    ``<exchange>.unrouted`` (the exchange's alternate exchange), never dropped.

    * ``emit()`` returns once the broker confirmed the message (publisher confirms, persistent
      delivery). A refused or unconfirmed publish, or a broker out of reach, raises
      :class:`~eventbus.TransportError` within ``2 * timeout`` seconds (the publish, then one
      try on a new connection), a hung broker included: nothing is dropped silently. When
      the connection broke after the message was sent the broker may have it anyway, so a
      caller that publishes again may publish twice (consumers deduplicate by event id, as
      for any redelivery).
    * A message is acknowledged once all of its local deliveries settled (succeeded or dead
      letter). A consumer that dies leaves its unacknowledged messages to the broker, which
      redelivers them to another consumer of the group. ``prefetch`` (default 100) bounds the
      messages a consumer holds unacknowledged: the backpressure.
    * A message delivered more than ``max_deliveries`` times (its consumers died with it) goes
      to the group's dead-letter queue ``<exchange>.<group>.dead`` through the exchange
      ``<exchange>.<group>.dlx`` (the quorum queue's delivery limit; the broker records the
      reason, ``delivery_limit``, in the message's ``x-death`` header). A message that cannot
      be decoded goes there at once, with the reason in its ``x-eventbus-reason`` header, and
      the consumer goes on.
    * Payloads are the same JSON as the store's and the Redis transport's (never pickle).
    * Connection loss: the consumer reports it, reconnects with backoff (0.1 s up to 5 s) and
      resumes; messages it held are redelivered by the broker. ``publish`` reconnects once and
      raises ``TransportError`` if that fails too.
    * Delayed events: ``publish(event, not_before=t)`` sets the header
      ``x-eventbus-not-before``; the consumer hands the message over as ``deliver(event,
      token, t)`` and the bus holds it, unacknowledged, until then.

    Thread-safe: ``publish`` from any thread; ``settled`` from any thread.
    """

    def __init__(
        self,
        url: str,
        *,
        exchange: str = "eventbus",
        group: str = "eventbus",
        prefetch: int = 100,
        max_deliveries: int = 5,
        timeout: float = 10.0,
        heartbeat: int = 30,
        codec: JsonCodec | None = None,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url must be a str (amqp://...), got {type(url).__name__}")
        for what, value in (("exchange", exchange), ("group", group)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{what} must be a non-empty str, got {value!r}")
        for what, number in (("prefetch", prefetch), ("max_deliveries", max_deliveries)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"{what} must be an int of at least 1, got {number!r}")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not (math.isfinite(timeout) and timeout > 0)
        ):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        try:
            self._parameters = pika.URLParameters(url)
        except Exception as exc:  # noqa: BLE001 - pika raises assorted types for a bad URL
            raise ValueError(f"not an AMQP URL: {without_password(url)} ({exc})") from None
        self._parameters.connection_attempts = 1
        self._parameters.socket_timeout = timeout
        self._parameters.stack_timeout = timeout
        self._parameters.blocked_connection_timeout = timeout
        self._parameters.heartbeat = heartbeat
        self.url = url
        self.exchange = exchange
        self.group = group
        self.queue = f"{exchange}.{group}"
        self.dead_exchange = f"{exchange}.{group}.dlx"
        self.dead_queue = f"{exchange}.{group}.dead"
        self.unrouted = f"{exchange}.unrouted"
        for derived in (self.dead_queue, self.dead_exchange, self.unrouted):
            if len(derived.encode()) > 255:  # AMQP's limit for exchange and queue names
                raise ValueError(
                    f"exchange and group make the name {derived[:40]!r}... longer than "
                    "AMQP's 255 bytes: choose shorter ones"
                )
        self.prefetch = prefetch
        self.max_deliveries = max_deliveries
        self.timeout = float(timeout)
        self.codec = codec if codec is not None else JsonCodec()
        self._where = without_password(url)
        self._publish_lock = threading.Lock()
        self._publisher: pika.BlockingConnection | None = None
        self._publish_channel: BlockingChannel | None = None
        self._patterns: tuple[str, ...] = ("**",)
        self._deliver: Deliver | None = None
        self._reporter: Reporter | None = None
        self._stop = threading.Event()
        self._consumer: threading.Thread | None = None
        self._handing: threading.Thread | None = None
        # Messages read by the consumer thread, handed to the bus by another thread: the
        # bus may block (backpressure), and the consumer thread must keep the connection alive.
        self._inbox: queue.Queue[tuple[int, int, Event, float | None] | None] = queue.Queue()
        self._connection: pika.BlockingConnection | None = None  # the consumer's
        self._channel: BlockingChannel | None = None
        self._generation = 0  # of the consumer's channel: a token of an older one is stale
        self._ready = threading.Event()

    # -- producing -----------------------------------------------------------------------

    def publish(self, event: Event, *, not_before: float | None = None) -> str:
        """Publish *event* and return its id once the broker confirmed it. Raises
        ``TypeError`` for a payload the codec cannot encode (nothing sent), ``ValueError`` for
        a name too long for a routing key, and :class:`~eventbus.TransportError` when the
        broker refused it, did not confirm it within ``timeout``, or cannot be reached (in all,
        within ``2 * timeout``)."""
        body = json.dumps(to_envelope(self.codec, event)._asdict()).encode()
        key = routing_key(event.name)
        if len(key.encode()) > 255:
            raise ValueError(f"event name {event.name[:60]!r}... is too long for AMQP (255 bytes)")
        headers: dict[str, Any] = {}
        if not_before is not None:
            headers[_NOT_BEFORE] = repr(float(not_before))
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/json",
            message_id=event.id,
            timestamp=int(time.time()),
            headers=headers or None,
        )
        with self._publish_lock:
            for attempt in (1, 2):
                try:
                    channel = self._publishing_channel()
                    self._publish_within_timeout(channel, key, body, properties)
                    return event.id
                except pika.exceptions.NackError:
                    raise TransportError(f"RabbitMQ at {self._where} refused {event.id}") from None
                except _BROKEN as exc:
                    self._drop_publisher()
                    if attempt == 2:
                        raise TransportError(
                            f"could not publish to RabbitMQ at {self._where}: "
                            f"{type(exc).__name__}: {exc}"
                        ) from exc
        raise AssertionError("unreachable")

    def _publish_within_timeout(
        self, channel: BlockingChannel, key: str, body: bytes, properties: Any
    ) -> None:
        """basic_publish, which waits for the broker's confirm with no deadline of its own (a
        hung broker is noticed only by missed heartbeats, minutes later): see
        :func:`_give_up_after`."""
        assert self._publisher is not None
        cancel = _give_up_after(self._publisher, self.timeout, "no confirm")
        try:
            channel.basic_publish(self.exchange, key, body, properties)
        finally:
            cancel()

    def _publishing_channel(self) -> BlockingChannel:
        """Under the publish lock: the publisher's channel, connected and set up if needed."""
        if self._publish_channel is None or not self._publish_channel.is_open:
            self._drop_publisher()
            connection = pika.BlockingConnection(self._parameters)
            try:
                channel = connection.channel()
                channel.confirm_delivery()
                self._declare_exchange(channel)
            except BaseException:
                _close_quietly(connection, self.timeout)
                raise
            self._publisher, self._publish_channel = connection, channel
        return self._publish_channel

    def _drop_publisher(self) -> None:
        connection, self._publisher, self._publish_channel = self._publisher, None, None
        if connection is not None:
            _close_quietly(connection, self.timeout)

    def _declare_exchange(self, channel: BlockingChannel) -> None:
        """The topic exchange, and the alternate exchange and queue that keep what no group
        is bound for."""
        channel.exchange_declare(self.unrouted, exchange_type="fanout", durable=True)
        channel.queue_declare(self.unrouted, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(self.unrouted, self.unrouted)
        channel.exchange_declare(
            self.exchange,
            exchange_type="topic",
            durable=True,
            arguments={"alternate-exchange": self.unrouted},
        )

    # -- consuming -----------------------------------------------------------------------

    def bind(self, patterns: Collection[str]) -> None:
        """The names and patterns the group's queue is bound for (the bus passes its
        subscriptions before :meth:`start`). Without a call, the queue gets every event."""
        self._patterns = tuple(sorted(set(patterns))) or ("**",)

    def start(self, deliver: Deliver, reporter: Reporter | None = None) -> int:
        """Declare the exchange, the group's queue (bound for :meth:`bind`'s patterns) and its
        dead-letter queue, and start consuming: each message goes to ``deliver(event, token)``
        (or ``deliver(event, token, not_before)``). Returns 0 (the broker redelivers a dead
        consumer's messages by itself). Raises :class:`~eventbus.TransportError` if the broker
        cannot be reached, ``RuntimeError`` if already started."""
        if self._deliver is not None:
            raise RuntimeError("this transport is already consuming")
        self._deliver, self._reporter = deliver, reporter
        deadline = time.monotonic() + self.timeout
        for pause in _RECONNECT:
            try:
                self._connect_consumer()
                break
            except pika.exceptions.ChannelClosedByBroker as exc:
                # Several consumers declaring a new quorum queue at once: the broker may accept
                # the declaration before the queue runs, and refuse the consume that follows
                # (541 INTERNAL_ERROR). It runs a moment later: try again.
                if exc.reply_code != 541 or time.monotonic() + pause > deadline:
                    self._deliver = None
                    raise TransportError(f"RabbitMQ at {self._where} refused: {exc}") from exc
                self._stop.wait(pause)
            except _BROKEN as exc:
                self._deliver = None
                raise TransportError(
                    f"could not reach RabbitMQ at {self._where}: {type(exc).__name__}: {exc}"
                ) from exc
        self._stop.clear()
        self._consumer = threading.Thread(
            target=self._consume_forever, name=f"eventbus-amqp-{self.queue}", daemon=True
        )
        self._handing = threading.Thread(
            target=self._hand_over_forever, name=f"eventbus-amqp-{self.queue}-in", daemon=True
        )
        self._consumer.start()
        self._handing.start()
        return 0

    def _connect_consumer(self) -> None:
        """On the thread that will own it: connect, declare the topology, start consuming."""
        connection = pika.BlockingConnection(self._parameters)
        try:
            channel = connection.channel()
            self._declare_exchange(channel)
            channel.exchange_declare(self.dead_exchange, exchange_type="fanout", durable=True)
            channel.queue_declare(
                self.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
            channel.queue_bind(self.dead_queue, self.dead_exchange)
            channel.queue_declare(
                self.queue,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": self.max_deliveries - 1,  # redeliveries after the first
                    "x-dead-letter-exchange": self.dead_exchange,
                },
            )
            for pattern in self._patterns:
                channel.queue_bind(self.queue, self.exchange, binding_key(pattern))
            channel.basic_qos(prefetch_count=self.prefetch)
            self._generation += 1
            generation = self._generation
            channel.basic_consume(
                self.queue,
                lambda ch, method, props, body: self._received(generation, ch, method, props, body),
            )
        except BaseException:
            _close_quietly(connection, self.timeout)
            raise
        self._connection, self._channel = connection, channel

    def _consume_forever(self) -> None:
        failures = 0
        while not self._stop.is_set():
            connection = self._connection
            try:
                if connection is None:
                    self._connect_consumer()
                    failures = 0
                    continue
                connection.process_data_events(time_limit=0.5)
            except Exception as exc:  # noqa: BLE001 - whatever broke: report, reconnect
                if self._stop.is_set():
                    break
                self._report(exc)
                self._drop_consumer()
                self._stop.wait(_RECONNECT[min(failures, len(_RECONNECT) - 1)])
                failures += 1
        self._drop_consumer()

    def _drop_consumer(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            # What it held unacknowledged goes back to the queue, for another consumer.
            _close_quietly(connection, self.timeout)

    def _received(
        self, generation: int, channel: BlockingChannel, method: Any, props: Any, body: bytes
    ) -> None:
        """On the consumer thread: decode, and queue for the hand-over thread; a message that
        cannot be decoded goes to the dead-letter queue now."""
        tag = method.delivery_tag
        try:
            event, not_before = self._decode(body, props)
        except Exception as exc:  # noqa: BLE001 - any decoding error: dead letter, go on
            self._dead_letter(channel, method, props, body, f"cannot decode: {_describe(exc)}")
            return
        self._inbox.put((generation, tag, event, not_before))

    def _decode(self, body: bytes, props: Any) -> tuple[Event, float | None]:
        fields = json.loads(body.decode("utf-8"))
        if not isinstance(fields, dict):
            raise ValueError("the message body is not a JSON object")
        # from_envelope checks every field's type: a missing or non-text one is a CodecError.
        envelope = Envelope(
            id=_field(fields, "id"),
            name=_field(fields, "name"),
            payload_type=_field(fields, "payload_type"),
            payload=_field(fields, "payload"),
            metadata=_field(fields, "metadata") or "{}",
            occurred_at=_field(fields, "occurred_at"),
        )
        event = from_envelope(self.codec, envelope)
        headers = props.headers or {}
        raw = headers.get(_NOT_BEFORE)
        not_before = None
        if raw is not None:
            not_before = float(raw.decode() if isinstance(raw, bytes) else raw)
            if not math.isfinite(not_before):
                raise ValueError(f"{_NOT_BEFORE} is not a finite time: {raw!r}")
        return event, not_before

    def _dead_letter(
        self, channel: BlockingChannel, method: Any, props: Any, body: bytes, reason: str
    ) -> None:
        """Move a message to the group's dead-letter queue with *reason*, then acknowledge
        it; if the move fails, reject it (the queue dead-letters it without the reason)."""
        headers = dict(props.headers or {})
        headers[_REASON] = reason
        try:
            channel.basic_publish(
                self.dead_exchange,
                method.routing_key,
                body,
                pika.BasicProperties(
                    delivery_mode=pika.DeliveryMode.Persistent,
                    content_type=props.content_type,
                    message_id=props.message_id,
                    headers=headers,
                ),
            )
            channel.basic_ack(method.delivery_tag)
        except pika.exceptions.AMQPError:
            channel.basic_reject(method.delivery_tag, requeue=False)
        if self._reporter is not None:
            fields = {"id": _text(props.message_id), "name": _text(method.routing_key)}
            self._reporter.stream_dead_lettered(
                str(method.delivery_tag), fields, reason[:_LOGGED_LIMIT]
            )

    def _hand_over_forever(self) -> None:
        """Hand each message to the bus (which may block: backpressure)."""
        deliver = self._deliver
        assert deliver is not None
        while True:
            item = self._inbox.get()
            if item is None:
                return
            generation, tag, event, not_before = item
            token = f"{generation}:{tag}"
            try:
                if not_before is None:
                    deliver(event, token)
                else:
                    deliver(event, token, not_before)
            except Exception as exc:  # noqa: BLE001 - unacknowledged: redelivered later
                self._report(exc)

    def settled(self, token: str) -> None:
        """Acknowledge the message whose local deliveries all settled. Thread-safe; never
        blocks on the broker; a message of a connection that broke meanwhile is not
        acknowledged (the broker redelivers it: at least once)."""
        generation_text, _, tag_text = token.partition(":")
        generation, tag = int(generation_text), int(tag_text)
        connection, channel = self._connection, self._channel
        if connection is None or channel is None or generation != self._generation:
            return

        def ack() -> None:
            if channel.is_open and generation == self._generation:
                channel.basic_ack(tag)

        try:
            connection.add_callback_threadsafe(ack)
        except Exception as exc:  # noqa: BLE001 - not acknowledged: redelivered later
            self._report(exc)

    def close(self) -> None:
        """Stop consuming (messages received but not acknowledged go back to the queue for
        another consumer) and close the connections. Idempotent."""
        self._stop.set()
        connection = self._connection
        if connection is not None:  # end the consumer thread's wait for data at once
            with contextlib.suppress(Exception):  # closed already: the thread is ending
                connection.add_callback_threadsafe(lambda: None)
        consumer, self._consumer = self._consumer, None
        if consumer is not None and consumer is not threading.current_thread():
            consumer.join(self.timeout + 5)
        handing, self._handing = self._handing, None
        if handing is not None:
            self._inbox.put(None)
            if handing is not threading.current_thread():
                handing.join(self.timeout + 5)
        self._deliver = None
        with self._publish_lock:
            self._drop_publisher()

    def ping(self) -> None:
        """Raise :class:`~eventbus.TransportError` unless the broker answers now."""
        try:
            connection = pika.BlockingConnection(self._parameters)
        except _BROKEN as exc:
            raise TransportError(
                f"RabbitMQ at {self._where} does not answer: {_describe(exc)}"
            ) from exc
        _close_quietly(connection, self.timeout)

    def _report(self, error: BaseException) -> None:
        reporter = self._reporter
        if reporter is not None:
            reporter.internal_error("transport", error)

    def __repr__(self) -> str:
        return (
            f"<RabbitMQTransport {self._where!r} exchange={self.exchange!r} group={self.group!r}>"
        )


def _give_up_after(
    connection: pika.BlockingConnection, seconds: float, why: str
) -> Callable[[], None]:
    """End *connection* after *seconds* unless the returned cancel is called first.

    pika's blocking calls (a publish waiting for its confirm, a close waiting for the broker's
    Close-Ok) have no deadline of their own: a broker that stopped answering is noticed only
    by missed heartbeats. A timer on the connection's I/O loop, which pika runs while it
    waits, ends the connection as pika's own heartbeat checker does, and the wait ends with a
    connection error. pika has no public call for this; should a later pika lack the
    internals used, the heartbeat bound remains. Call on the connection's own thread."""
    impl: Any = getattr(connection, "_impl", None)
    ioloop: Any = getattr(impl, "ioloop", None)
    if ioloop is None or not hasattr(impl, "_terminate_stream"):
        return lambda: None

    def give_up() -> None:
        impl._terminate_stream(pika.exceptions.AMQPHeartbeatTimeout(f"{why} within {seconds:g} s"))

    timer = ioloop.call_later(seconds, give_up)

    def cancel() -> None:
        with contextlib.suppress(Exception):  # the loop may be gone with the stream
            ioloop.remove_timeout(timer)

    return cancel


def _close_quietly(connection: pika.BlockingConnection, timeout: float) -> None:
    """Close *connection*, waiting at most *timeout* for a broker that does not answer."""
    with contextlib.suppress(Exception):  # closing a broken connection: nothing to do
        if connection.is_open:
            _give_up_after(connection, timeout, "no answer to close")
            connection.close()


def _field(fields: dict[str, Any], key: str) -> Any:
    return fields.get(key)


def _describe(error: BaseException) -> str:
    # Some pika errors have no message of their own; their repr names what they carry.
    return f"{type(error).__name__}: {error or repr(error)}"


def _text(value: object) -> str:
    return "" if value is None else str(value)[:_LOGGED_LIMIT]
