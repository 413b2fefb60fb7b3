"""Event names and subscription patterns: validation and matching as pure functions."""

from __future__ import annotations

import pytest

from eventbus._matching import compile_pattern, validate_name
from eventbus.exceptions import EventBusError, InvalidEventNameError

VALID_NAMES = [
    "order",
    "order:created",
    "billing:invoice.paid",
    "user-account:password_reset",
    "a:b:c:d:e",
    "v2:Order.Created-1",
    "...",
    "_:-",
]

INVALID_NAMES = [
    "",
    ":",
    "a::b",
    "a:",
    ":a",
    "order created",
    " order",
    "order:created ",
    "order:created\n",
    "order*",
    "order:*",
    "order:**",
    "order/created",
    "a;b",
]

INVALID_PATTERNS = [
    "",
    ":",
    "a::b",
    "a:",
    ":a",
    "order created",
    "order*",
    "*order",
    "order:cre*ted",
    "***",
    "order:*\n",
    "a:*:",
    "order/**",
    "billing:invoice.*",
]

# (pattern, event name, matches?)
MATCH_TABLE = [
    ("order:created", "order:created", True),
    ("order:created", "order:updated", False),
    ("order:created", "order:created:v2", False),
    ("order:created", "order", False),
    ("order", "order", True),
    ("order", "Order", False),
    ("*", "order", True),
    ("*", "order:created", False),
    ("order:*", "order:created", True),
    ("order:*", "order:shipped", True),
    ("order:*", "order", False),
    ("order:*", "order:created:v2", False),
    ("order:*", "orders:created", False),
    ("*:created", "order:created", True),
    ("*:created", "user:created", True),
    ("*:created", "order:created:v2", False),
    ("*:*", "a:b", True),
    ("*:*", "a", False),
    ("*:*", "a:b:c", False),
    ("**", "order", True),
    ("**", "order:created", True),
    ("**", "a:b:c:d:e:f", True),
    ("order:**", "order:created", True),
    ("order:**", "order:created:v2:final", True),
    ("order:**", "order", False),
    ("order:**", "orders:created", False),
    ("**:created", "order:created", True),
    ("**:created", "shop:order:created", True),
    ("**:created", "created", False),
    ("a:**:z", "a:b:z", True),
    ("a:**:z", "a:b:c:d:z", True),
    ("a:**:z", "a:z", False),
    ("a:**:z", "a:b:z:y", False),
    ("a:*:z", "a:b:z", True),
    ("a:*:z", "a:b:c:z", False),
    ("billing:*", "billing:invoice.paid", True),
    ("billing:invoice.paid", "billing:invoiceXpaid", False),
    ("user-account:*", "user-account:password_reset", True),
    ("a.b:**", "a.b:c", True),
    ("a.b:**", "aXb:c", False),
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_name_is_returned_unchanged(name: str) -> None:
    """A name of ':'-separated segments of letters, digits, '_', '-' and '.' is accepted."""
    assert validate_name(name) == name


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_malformed_name_is_rejected(name: str) -> None:
    """An empty or malformed name (including a wildcard) raises InvalidEventNameError."""
    with pytest.raises(InvalidEventNameError, match="invalid event name"):
        validate_name(name)


@pytest.mark.parametrize("name", [None, 42, b"order:created", ["order"]])
def test_non_string_name_is_a_type_error(name: object) -> None:
    """A name that is not a str raises TypeError, not InvalidEventNameError."""
    with pytest.raises(TypeError, match="must be a str") as info:
        validate_name(name)
    assert not isinstance(info.value, InvalidEventNameError)


def test_invalid_event_name_error_is_a_value_error() -> None:
    """InvalidEventNameError is both an EventBusError and a ValueError."""
    assert issubclass(InvalidEventNameError, ValueError)
    assert issubclass(InvalidEventNameError, EventBusError)


@pytest.mark.parametrize("text", INVALID_PATTERNS)
def test_malformed_pattern_is_rejected(text: str) -> None:
    """A malformed pattern, or a wildcard that is not a whole segment, is rejected."""
    with pytest.raises(InvalidEventNameError, match="invalid pattern"):
        compile_pattern(text)


@pytest.mark.parametrize("text", [None, 42, 1.5])
def test_non_string_pattern_is_a_type_error(text: object) -> None:
    """A pattern that is not a str raises TypeError."""
    with pytest.raises(TypeError, match="must be a str"):
        compile_pattern(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["order", "order:created", "billing:invoice.paid"])
def test_pattern_without_wildcards_is_exact(text: str) -> None:
    """A pattern without '*' segments is compiled as exact."""
    pattern = compile_pattern(text)
    assert pattern.exact
    assert pattern.text == text


@pytest.mark.parametrize("text", ["*", "**", "order:*", "a:**:z", "*:created"])
def test_pattern_with_wildcards_is_not_exact(text: str) -> None:
    """A pattern with a '*' or '**' segment is compiled as a wildcard pattern."""
    pattern = compile_pattern(text)
    assert not pattern.exact
    assert pattern.text == text


@pytest.mark.parametrize(("text", "name", "expected"), MATCH_TABLE)
def test_pattern_matches_table(text: str, name: str, expected: bool) -> None:
    """Each pattern matches exactly the names the table says it does."""
    assert compile_pattern(text).matches(name) is expected


@pytest.mark.parametrize("name", VALID_NAMES)
def test_double_star_alone_matches_every_name(name: str) -> None:
    """The pattern '**' alone matches every valid event name."""
    assert compile_pattern("**").matches(name)


@pytest.mark.parametrize("name", VALID_NAMES)
def test_exact_pattern_matches_its_own_name(name: str) -> None:
    """Every valid name, used as a pattern, matches itself."""
    assert compile_pattern(name).matches(name)


def test_compiled_pattern_is_reused() -> None:
    """Compiling the same pattern text twice gives the same compiled object."""
    assert compile_pattern("order:*") is compile_pattern("order:*")


def test_pattern_is_immutable() -> None:
    """A compiled pattern cannot be changed after compilation."""
    pattern = compile_pattern("order:*")
    with pytest.raises(AttributeError):
        pattern.text = "**"  # type: ignore[misc]
