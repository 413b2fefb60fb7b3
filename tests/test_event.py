"""The event envelope: what its repr shows, and what it never shows."""

from __future__ import annotations

from eventbus import DeadLetter, Event

SECRET = "hunter2"


def test_event_repr_names_the_event_without_payload_values() -> None:
    """An Event's repr shows its name and id but no payload or metadata value."""
    event = Event(name="user:signed_up", payload={"password": SECRET}, metadata={"auth": SECRET})
    text = repr(event)
    assert "user:signed_up" in text
    assert event.id in text
    assert SECRET not in text
    assert "dict" in text  # the payload's type, so a reader knows there is one


def test_dead_letter_repr_carries_no_payload_or_traceback() -> None:
    """A DeadLetter's repr leaves out the payload (via the event's repr) and the traceback."""
    event = Event(name="user:signed_up", payload={"password": SECRET})
    letter = DeadLetter(
        id="d1",
        event=event,
        handler="welcome",
        attempts=3,
        error="RuntimeError: boom",
        reason="exhausted",
        traceback=f'  File "x.py", line 1\n    password = "{SECRET}"',
    )
    text = repr(letter)
    assert "welcome" in text
    assert SECRET not in text


def test_events_still_compare_by_value() -> None:
    """Leaving the payload out of the repr does not change equality."""
    a = Event(name="a:b", payload={"x": 1}, id="1")
    assert a == Event(name="a:b", payload={"x": 1}, id="1", occurred_at=a.occurred_at)
    assert a != Event(name="a:b", payload={"x": 2}, id="1", occurred_at=a.occurred_at)
