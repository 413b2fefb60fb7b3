"""Settings, and the container that builds the service around one bus (and closes it).

Everything is built here and handed down explicitly: no module-level bus, database or
service, so a test builds a fresh, isolated app in a temporary folder with zero latency.

The bus is durable by default: an ``eventbus.stores.SQLiteStore`` keeps every delivery's state
in the orders database itself (its tables beside the orders), so ``OrderService`` writes each
order and its event in one transaction (``emit(..., within=connection)``). At startup
:func:`build_app` registers the handlers, then ``bus.recover()`` takes over what a crashed (or
stopped) process left unfinished, committed events whose handlers never started included;
``app.recovered`` logs how many deliveries that was.

With ``Settings.redis_url`` the service is split into processes that share one Redis stream
(and the orders database): :func:`build_app` then builds the API, whose bus has the same store
as its outbox and a ``RedisStreamsTransport``: each event is committed with its order, and the
bus's relay publishes it to the stream afterwards (retrying while Redis is down).
:func:`build_worker` builds a worker, which registers the handlers and consumes the stream with
``bus.start()``. See the README's "Several processes with Redis".

With ``Settings.amqp_url`` instead, the same split runs through RabbitMQ
(``RabbitMQTransport``): the API's relay publishes to a topic exchange, and the workers share
one queue (their group). RabbitMQ has no ``once`` helper, so the workers' handlers are not
wrapped: they rely on their own idempotency (see the README's "Several processes with
RabbitMQ"). pika, the RabbitMQ client, is imported only in that mode.
"""

from __future__ import annotations

import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import structlog
import tenacity

from eventbus import DeadLetter, EventBus, RetryPolicy
from eventbus.codec import JsonCodec
from eventbus.stores import SQLiteStore
from eventbus.transports import RedisStreamsTransport
from examples.order_service.domain import OrderCreated, OrderShipped
from examples.order_service.fakes import (
    AnalyticsService,
    InventoryService,
    Mailer,
    OutboxMailer,
    Services,
    WarehouseService,
)
from examples.order_service.handlers import WaitStrategy, register_handlers
from examples.order_service.orders import OrderService
from examples.order_service.repository import SqliteOrderRepository

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from eventbus.transports import RabbitMQTransport

__all__ = [
    "VAR_DIR",
    "OrderApp",
    "Settings",
    "ShutdownReport",
    "build_app",
    "build_worker",
    "display_path",
    "display_url",
    "python_command",
]

#: Where the database and the outbox go by default (git-ignored).
VAR_DIR = Path(__file__).resolve().parent / "var"

# The fakes' typical latency in seconds, multiplied by ``Settings.latency``.
MAILER_LATENCY = 0.15
INVENTORY_LATENCY = 0.05
WAREHOUSE_LATENCY = 0.2
ANALYTICS_LATENCY = 0.02


def display_path(path: Path | str) -> str:
    """*path* as the commands print and log it: relative to the current directory when it is
    inside it (``examples/order_service/var/...`` from the repository root), else unchanged."""
    if str(path) == ":memory:":
        return str(path)
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def display_url(url: str) -> str:
    """*url* as the commands print and log it: without its password
    (``amqp://guest:***@localhost:5672/``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def python_command() -> str:
    """How to run this Python again, for the commands the output suggests (``.venv/bin/python``
    from the repository root, with the virtual environment ``make example`` creates)."""
    return display_path(sys.executable) if sys.executable else "python"


def _server_backoff() -> WaitStrategy:
    # 0.5 s, 1 s, 2 s, ... capped at 10 s: what a service talking to real systems wants.
    return tenacity.wait_exponential(multiplier=0.5, max=10)


def _contended_skus() -> dict[str, int]:
    # Reservations of the monitor hit a hot stock row: two lock timeouts, then it goes through.
    return {"MN-303": 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """How to build the service. The defaults are the server's."""

    #: The SQLite file of the orders, their audit trail and the bus's event store.
    db_path: Path | str = VAR_DIR / "orders.sqlite3"
    outbox_dir: Path = VAR_DIR / "outbox"
    #: ``False``: no event store; deliveries live in memory and die with the process, and
    #: events are emitted after their order's commit (``serve --no-store``). Redis and
    #: AMQP mode need the store: it is the API's outbox.
    durable: bool = True
    #: At startup, take over the store's unfinished deliveries (``bus.recover()``).
    recover: bool = True
    #: Scales the fakes' latency: ``1.0`` is realistic, ``0`` is instant (tests).
    latency: float = 1.0
    #: Backoff between attempts of a failing handler (any tenacity wait strategy).
    retry_wait: WaitStrategy = field(default_factory=_server_backoff)
    #: Attempts per delivery, the first included, for handlers without their own policy.
    max_attempts: int = 3
    max_workers: int = 8
    #: SKU -> how many transient failures each reservation touching it suffers first.
    contended_skus: Mapping[str, int] = field(default_factory=_contended_skus)
    #: How long shutdown waits for running handlers.
    close_timeout: float = 10.0
    #: ``redis://...``: split into an API process (:func:`build_app`: commits events to its
    #: outbox, the store in ``db_path``, and relays them to this Redis) and worker processes
    #: (:func:`build_worker`) consuming them.
    redis_url: str | None = None
    #: The stream the events go through, and the consumer group the workers share.
    redis_stream: str = "orders"
    redis_group: str = "order-service"
    #: Seconds an entry may sit unacknowledged with a worker before another takes it over.
    claim_idle: float = 30.0
    #: Seconds a Redis command waits to connect and again for the reply, before the transport
    #: gives up (``TransportError``): bounds how long a request waits on a Redis that hangs.
    redis_timeout: float = 2.0
    #: ``amqp://...``: the same split through RabbitMQ instead of Redis (not both).
    amqp_url: str | None = None
    #: The topic exchange the events go through, and the workers' group: one queue,
    #: ``<exchange>.<group>``, shared by the workers as competing consumers.
    amqp_exchange: str = "orders"
    amqp_group: str = "order-service"
    #: Seconds the RabbitMQ transport waits to connect, or for a publish to be confirmed,
    #: before it gives up (``TransportError``).
    amqp_timeout: float = 2.0

    def __post_init__(self) -> None:
        if self.redis_url is not None and self.amqp_url is not None:
            raise ValueError("redis_url and amqp_url: pick one transport")

    @property
    def transport_url(self) -> str | None:
        """The URL of the transport the service is split through (Redis or RabbitMQ), or
        ``None`` for one process."""
        return self.redis_url if self.redis_url is not None else self.amqp_url

    def store_path(self) -> Path | None:
        """The event store's file: the orders database itself, or ``None`` without a store
        (``durable=False``). Raises ``ValueError`` for a durable in-memory database: the
        store shares the file through a connection of its own, which ``":memory:"`` is not."""
        if not self.durable:
            return None
        if str(self.db_path) == ":memory:":
            raise ValueError(
                "an event store needs a database file it can share with the orders; "
                "pass durable=False to keep an in-memory database"
            )
        return Path(self.db_path)


@dataclass(frozen=True, slots=True)
class ShutdownReport:
    """What was left when the app closed. With an event store nothing is abandoned: retries
    not yet due stay in the store for the next start (``bus.closed`` logs ``left_in_store``),
    and ``dead_letters`` are the store's, kept for ``.venv/bin/python -m eventbus dead-letters``."""

    abandoned: list[DeadLetter]
    dead_letters: list[DeadLetter]
    still_running: bool


@dataclass(slots=True, kw_only=True)
class OrderApp:
    """The assembled service: one bus, the repository, the fakes, and ``OrderService``.

    Closing it closes the bus (letting running handlers finish) and then the database. Use it
    as a context manager, or call :meth:`close`.
    """

    settings: Settings
    bus: EventBus
    repository: SqliteOrderRepository
    services: Services
    orders: OrderService
    #: The event store's file (the orders database), ``None`` when the bus has no store.
    events_path: Path | None = None
    #: The transport in redis or AMQP mode (API or worker), else ``None``.
    transport: RedisStreamsTransport | RabbitMQTransport | None = None
    #: A worker's count of stale entries it took over from stopped workers at startup.
    taken_over: int = 0
    #: With tracing on (``--trace``): the provider the bus is instrumented with, for the
    #: spans the demo and the web layer open around each order (``tracing.span``).
    tracer_provider: TracerProvider | None = None
    _report: ShutdownReport | None = field(default=None, init=False, repr=False)

    @property
    def inventory(self) -> InventoryService:
        return self.services.inventory

    @property
    def warehouse(self) -> WarehouseService:
        return self.services.warehouse

    @property
    def analytics(self) -> AnalyticsService:
        return self.services.analytics

    def close(self, timeout: float | None = None) -> ShutdownReport:
        """Close the bus (up to *timeout*, default ``settings.close_timeout``), then the
        database, and log what was left. Idempotent: later calls return the first report."""
        if self._report is not None:
            return self._report
        log = structlog.get_logger("order_service")
        # With a store, the dead letters are read while it is open (close() closes it; it
        # makes no dead letters then, it leaves unfinished work in the store). Without one,
        # after close(), which turns retries not yet due into "abandoned" dead letters.
        kept = self.bus.dead_letters() if self.events_path is not None else []
        self.bus.close(timeout=self.settings.close_timeout if timeout is None else timeout)
        dead_letters = kept if self.events_path is not None else self.bus.dead_letters()
        abandoned = [d for d in dead_letters if d.abandoned]
        # After close(), drain(0) answers "is any handler still running?" without waiting.
        still_running = not self.bus.drain(timeout=0)
        if not still_running:
            self.repository.close()
        report = self._report = ShutdownReport(abandoned, dead_letters, still_running)
        level = log.warning if dead_letters or still_running else log.info
        if self.events_path is not None:  # nothing is lost: it is all in the store
            log.info(
                "app.closed",
                dead_letters=len(dead_letters),
                still_running=still_running,
                events=display_path(self.events_path),
            )
            return report
        level(
            "app.closed",
            abandoned=len(abandoned),
            dead_letters=len(dead_letters),
            still_running=still_running,
            lost=[f"{d.handler}:{d.event.id}" for d in dead_letters],
        )
        return report

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def build_app(
    settings: Settings | None = None,
    *,
    bus: EventBus | None = None,
    mailer: Mailer | None = None,
    tracer_provider: TracerProvider | None = None,
) -> OrderApp:
    """Build the service from *settings* and recover what an earlier process left (see the
    module docstring). Tests may pass their own *bus* (e.g. from
    ``eventbus.testing.inline_bus()``; it is used as it is, without a store or recovery, and
    events are emitted after their order's commit) or *mailer*; the app owns and closes them.

    With ``settings.redis_url`` (or ``amqp_url``) this is the API process: its bus commits
    each event to its outbox (the store in the orders database) with the order, and relays
    it to the stream (or the exchange); it has no handlers (the workers of
    :func:`build_worker` run them). Raises ``ValueError`` for a durable in-memory database,
    or redis or AMQP mode without a store (``durable=False``).

    With a *tracer_provider* the bus is instrumented with it (``eventbus.otel``) before
    anything is emitted or recovered, and the app keeps it for its own spans (see
    :mod:`examples.order_service.tracing`); ``opentelemetry`` is imported only then.
    """
    settings = settings or Settings()
    if bus is None and settings.transport_url is not None:
        return _build_api(settings, mailer, tracer_provider)
    events_path = None
    if bus is None:
        events_path = settings.store_path()
        bus = EventBus(
            max_workers=settings.max_workers,
            retry=RetryPolicy(max_attempts=settings.max_attempts, wait=settings.retry_wait),
            name="orders",
            store=None if events_path is None else _store(events_path),
        )
    try:
        _instrument(bus, tracer_provider)
        repository = SqliteOrderRepository(settings.db_path)
    except BaseException:
        bus.close()
        raise
    services = _services(settings, mailer)
    register_handlers(bus, repository=repository, services=services, retry_wait=settings.retry_wait)
    app = OrderApp(
        settings=settings,
        bus=bus,
        repository=repository,
        services=services,
        # With a store in the orders database, each event is committed with its order.
        orders=OrderService(repository, bus, transactional=events_path is not None),
        events_path=events_path,
        tracer_provider=tracer_provider,
    )
    if events_path is not None and settings.recover:
        try:
            recovered = bus.recover()  # handlers are registered: their deliveries can run
        except BaseException:
            app.close()
            raise
        structlog.get_logger("order_service").info(
            "app.recovered", recovered=recovered, events=display_path(events_path)
        )
    return app


def _build_api(
    settings: Settings, mailer: Mailer | None, tracer_provider: TracerProvider | None
) -> OrderApp:
    """Redis or AMQP mode's API process: a bus with the store as its outbox and the
    transport."""
    events_path = settings.store_path()
    if events_path is None:
        raise ValueError(
            "redis and AMQP mode need the event store: it is the API's outbox (durable=True)"
        )
    store = _store(events_path)
    try:
        transport = _transport(settings)
    except BaseException:
        store.close()
        raise
    try:
        # Store and transport: emit() commits to the store (the outbox); the bus's relay
        # publishes to Redis (or RabbitMQ) afterwards, in order, retrying while it is down. A relay
        # started later (this process restarted) publishes what an earlier one left.
        bus = EventBus(max_workers=1, name="orders", store=store, transport=transport)
    except BaseException:
        transport.close()
        store.close()
        raise
    try:
        _instrument(bus, tracer_provider)
        repository = SqliteOrderRepository(settings.db_path)
    except BaseException:
        bus.close()
        raise
    return OrderApp(
        settings=settings,
        bus=bus,
        repository=repository,
        services=_services(settings, mailer),
        orders=OrderService(repository, bus),
        events_path=events_path,
        transport=transport,
        tracer_provider=tracer_provider,
    )


def _instrument(bus: EventBus, tracer_provider: TracerProvider | None) -> None:
    if tracer_provider is not None:
        # Imported here: opentelemetry is needed only with tracing on.
        from examples.order_service.tracing import instrument_bus

        instrument_bus(bus, tracer_provider)


def _store(path: Path) -> SQLiteStore:
    """The event store, in the orders database (created first, so the store creates the file
    readable by its owner only; the repository adds its tables beside the store's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return SQLiteStore(path)


def build_worker(settings: Settings, *, mailer: Mailer | None = None) -> OrderApp:
    """A worker process's app (``settings.redis_url`` or ``amqp_url`` is required): the
    handlers on a bus that consumes the Redis stream (or the group's RabbitMQ queue) as one
    of the group's competing consumers.

    With Redis, the handlers with outside effects are wrapped with ``transport.once``, so an
    event that is delivered again (a worker died before acknowledging it) does not repeat
    them. RabbitMQ has no such helper: the handlers run again on a redelivery and rely on
    their own idempotency (see :mod:`examples.order_service.handlers`). It calls
    ``bus.start()`` after registering the handlers, so it returns with the transport's
    consumer running (with RabbitMQ, the group's queue bound for what the handlers subscribe
    to); ``app.taken_over`` says how many stale entries it took over at startup (always 0
    with RabbitMQ, which redelivers a dead consumer's messages by itself). Raises
    ``TransportError`` when the transport does not answer.
    """
    if settings.transport_url is None:
        raise ValueError("a worker needs Settings.redis_url or Settings.amqp_url")
    transport = _transport(settings)
    try:
        transport.ping()  # fail before building anything when the broker is not there
    except BaseException:
        transport.close()
        raise
    bus = EventBus(
        max_workers=settings.max_workers,
        retry=RetryPolicy(max_attempts=settings.max_attempts, wait=settings.retry_wait),
        name="orders",
        transport=transport,
    )
    repository = SqliteOrderRepository(settings.db_path)
    services = _services(settings, mailer)
    register_handlers(
        bus,
        repository=repository,
        services=services,
        retry_wait=settings.retry_wait,
        once=transport.once if isinstance(transport, RedisStreamsTransport) else None,
    )
    app = OrderApp(
        settings=settings,
        bus=bus,
        repository=repository,
        services=services,
        # A worker places no orders; its bus has no store to write events with.
        orders=OrderService(repository, bus, transactional=False),
        transport=transport,
    )
    try:
        app.taken_over = bus.start()  # after register_handlers: starts consuming
    except BaseException:
        app.close()
        raise
    return app


def _transport(settings: Settings) -> RedisStreamsTransport | RabbitMQTransport:
    # The event classes are registered with the transport's codec by hand: the bus registers
    # the classes it subscribes only with a store's codec, and a worker whose codec does not
    # know OrderCreated moves every entry to the dead stream ("cannot decode").
    codec = JsonCodec()
    for event_class in (OrderCreated, OrderShipped):
        codec.register(event_class)
    if settings.amqp_url is not None:
        # Imported here: pika (the ``rabbitmq`` extra) is needed only in AMQP mode.
        from eventbus.transports import RabbitMQTransport

        # Undecodable and poison messages go to the queue <exchange>.<group>.dead; the bus
        # logs each one it is told of (stream.dead_lettered), through the transport's reporter.
        return RabbitMQTransport(
            settings.amqp_url,
            exchange=settings.amqp_exchange,
            group=settings.amqp_group,
            codec=codec,
            timeout=settings.amqp_timeout,
        )
    assert settings.redis_url is not None
    transport = RedisStreamsTransport(
        settings.redis_url,
        stream=settings.redis_stream,
        group=settings.redis_group,
        claim_idle=settings.claim_idle,
        codec=codec,
        socket_timeout=settings.redis_timeout,
    )
    # The bus does not log entries the transport dead-letters (undecodable, or delivered more
    # than max_deliveries times): say so, or they vanish into the dead stream unnoticed.
    log = structlog.get_logger("order_service")
    transport.on_dead = lambda entry_id, fields, reason: log.error(
        "stream.dead_lettered",
        entry_id=entry_id,
        event_id=fields.get("id"),
        event_name=fields.get("name"),
        reason=reason,
        dead_stream=transport.dead_stream,
    )
    return transport


def _services(settings: Settings, mailer: Mailer | None) -> Services:
    scale = settings.latency
    return Services(
        mailer=mailer or OutboxMailer(settings.outbox_dir, latency=MAILER_LATENCY * scale),
        inventory=InventoryService(
            contended_skus=settings.contended_skus, latency=INVENTORY_LATENCY * scale
        ),
        warehouse=WarehouseService(latency=WAREHOUSE_LATENCY * scale),
        analytics=AnalyticsService(latency=ANALYTICS_LATENCY * scale),
    )
