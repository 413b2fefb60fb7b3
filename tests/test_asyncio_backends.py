"""``async def`` handlers with a store and with a transport: every delivery still ends in a
known place, and nothing that talks to a disk or a server runs on the event loop."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from eventbus import Event, EventBus, RetryPolicy
from eventbus.stores import SQLiteStore
from eventbus.testing import FakeClock
from eventbus.transports import RedisStreamsTransport

pytestmark = pytest.mark.anyio


class RecordingStore(SQLiteStore):
    """A SQLite store that notes which thread made each delivery write."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.threads: list[str] = []

    def started(self, event_id: str, handler: str, attempts: int) -> None:
        self.threads.append(threading.current_thread().name)
        super().started(event_id, handler, attempts)

    def succeeded(self, event_id: str, handler: str) -> None:
        self.threads.append(threading.current_thread().name)
        super().succeeded(event_id, handler)

    def add(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().add(*args, **kwargs)


async def test_store_writes_of_aemit_and_async_deliveries_run_off_the_loop(tmp_path):
    """With a store, aemit()'s commit and an async delivery's start and success commits are
    made on the bus's offload threads, never on the loop's thread; the store then says the
    delivery succeeded."""
    store = RecordingStore(tmp_path / "events.db")
    loop_thread = threading.current_thread().name
    ran: list[str] = []
    async with EventBus(store=store, clock=FakeClock()) as bus:

        @bus.on("order:created", name="confirm")
        async def confirm(event: Event) -> None:
            ran.append(threading.current_thread().name)

        event = await bus.aemit("order:created", {"id": 7})
        assert await bus.adrain(timeout=10)
        assert bus.status(event.id)["confirm"].state == "succeeded"
    assert ran == [loop_thread]
    assert len(store.threads) == 3  # add, started, succeeded
    assert loop_thread not in store.threads
    assert all(name.startswith("eventbus-offload") for name in store.threads)


async def test_async_delivery_cancelled_at_close_stays_in_the_store_for_recovery(tmp_path):
    """An async delivery cancelled by aclose()'s timeout is left unfinished in the store (not
    lost, not a dead letter) and a later bus's recover() runs it to success."""
    path = tmp_path / "events.db"
    started = asyncio.Event()
    async with EventBus(store=SQLiteStore(path), clock=FakeClock()) as bus:

        @bus.on("order:created", name="confirm")
        async def stuck(event: Event) -> None:
            started.set()
            await asyncio.Event().wait()

        event = await bus.aemit("order:created")
        await started.wait()
        await bus.aclose(timeout=0.05)
    assert bus.dead_letters() == []

    recovered: list[str] = []
    async with EventBus(store=SQLiteStore(path), clock=FakeClock()) as later:

        @later.on("order:created", name="confirm")
        async def confirm(event: Event) -> None:
            recovered.append(event.id)

        assert await asyncio.to_thread(later.recover) == 1
        assert await later.adrain(timeout=10)
        assert later.status(event.id)["confirm"].state == "succeeded"
    assert recovered == [event.id]


async def test_failed_async_delivery_with_a_store_is_a_stored_dead_letter(tmp_path):
    """A failing async handler's retries and dead letter are recorded in the store."""
    async with EventBus(
        store=SQLiteStore(tmp_path / "events.db"),
        clock=FakeClock(),
        retry=RetryPolicy(max_attempts=1),
    ) as bus:

        @bus.on("order:created", name="broken")
        async def broken(event: Event) -> None:
            raise RuntimeError("template missing")

        event = await bus.aemit("order:created")
        assert await bus.adrain(timeout=10)
        [letter] = bus.dead_letters()
        assert (letter.event.id, letter.handler, letter.reason) == (event.id, "broken", "exhausted")
        assert "template missing" in letter.error


@pytest.mark.integration
async def test_async_handlers_consume_a_redis_stream(redis_url):
    """A consuming bus delivers stream entries to its async handlers on its loop; aemit()
    publishes off the loop."""
    suffix = uuid.uuid4().hex
    options = {"stream": f"test:{suffix}", "group": f"group:{suffix}", "block": 0.05}
    received: list[Any] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    consumer = EventBus(transport=RedisStreamsTransport(redis_url, **options))
    producer = EventBus(transport=RedisStreamsTransport(redis_url, **options))
    try:
        async with consumer:

            @consumer.on("order:created")
            async def confirm(event: Event) -> None:
                assert asyncio.get_running_loop() is loop
                received.append(event.payload)
                if len(received) == 3:
                    done.set()

            await asyncio.to_thread(consumer.start)
            for n in range(3):
                await producer.aemit("order:created", {"n": n})
            await asyncio.wait_for(done.wait(), 10)
            assert await consumer.adrain(timeout=10)
    finally:
        await producer.aclose()
        await consumer.aclose()
    assert sorted(p["n"] for p in received) == [0, 1, 2]
