"""Transports: how events reach buses in other processes. ``RedisStreamsTransport`` needs the
``redis`` extra (``pip install 'eventbus[redis]'``), ``RabbitMQTransport`` the ``rabbitmq`` extra
(``pip install 'eventbus[rabbitmq]'``); each is imported only when used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eventbus.transports.rabbitmq import RabbitMQTransport
    from eventbus.transports.redis_streams import RedisStreamsTransport

__all__ = ["RabbitMQTransport", "RedisStreamsTransport"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import eventbus.transports` works without the client packages installed.
    if name == "RedisStreamsTransport":
        from eventbus.transports.redis_streams import RedisStreamsTransport  # noqa: PLC0415

        return RedisStreamsTransport
    if name == "RabbitMQTransport":
        from eventbus.transports.rabbitmq import RabbitMQTransport  # noqa: PLC0415

        return RabbitMQTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
