"""How transports show a server's URL in reprs and errors: never with its password."""

from __future__ import annotations

import pytest

from eventbus.transports._urls import without_password

SECRET = "s3cret-do-not-show"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{SECRET}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (f"amqp://app:{SECRET}@[::1]:5672/", "amqp://app:***@[::1]:5672/"),
        (f"redis://127.0.0.1/0?password={SECRET}&db=1", "redis://127.0.0.1/0?password=***&db=1"),
        (f"rediss://u:{SECRET}@h/0?password={SECRET}", "rediss://u:***@h/0?password=***"),
        ("redis://127.0.0.1:6379/0?db=1", "redis://127.0.0.1:6379/0?db=1"),
        ("amqp://guest@h/%2F?heartbeat=10", "amqp://guest@h/%2F?heartbeat=10"),
    ],
)
def test_the_password_is_hidden_and_the_rest_kept_as_written(url: str, shown: str) -> None:
    assert without_password(url) == shown
    assert SECRET not in without_password(url)
