"""Shared fixtures: every bus a test makes is closed when the test ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from eventbus import EventBus, RetryPolicy
from eventbus.testing import FakeClock, inline_bus


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Each test starts from structlog's defaults, whatever an earlier test configured."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock: backoffs run only when the test advances it."""
    return FakeClock()


@pytest.fixture
def bus(clock: FakeClock) -> Iterator[EventBus]:
    """A bus on 4 real worker threads whose retries wait on the fake clock."""
    with EventBus(max_workers=4, clock=clock, retry=RetryPolicy(max_attempts=3)) as b:
        yield b


@pytest.fixture
def inline() -> Iterator[tuple[EventBus, FakeClock]]:
    """A bus that runs handlers on the test's thread, with its fake clock."""
    b, c = inline_bus()
    yield b, c
    b.close()
