"""Event names and subscription patterns: validation and matching, compiled once (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from eventbus.exceptions import InvalidEventNameError

__all__ = ["Pattern", "compile_pattern", "validate_name"]

_SEGMENT = r"[A-Za-z0-9_.\-]+"
_NAME = re.compile(rf"{_SEGMENT}(?::{_SEGMENT})*")
_SEGMENT_ONLY = re.compile(_SEGMENT)
# ASCII only, on purpose: names end up in log lines, metrics labels and Redis stream keys.
_RULES = (
    "names are ':'-separated segments of letters, digits, '_', '-' and '.', e.g. 'order:created'"
)


@lru_cache(maxsize=4096)
def _is_valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def validate_name(name: object) -> str:
    """Return *name* if it is a valid event name; raise ``InvalidEventNameError`` (a
    ``ValueError``) if it is empty or malformed, ``TypeError`` if it is not a string."""
    if not isinstance(name, str):
        raise TypeError(f"event name must be a str, got {type(name).__name__}")
    if not _is_valid_name(name):
        raise InvalidEventNameError(f"invalid event name {name!r}: {_RULES}")
    return name


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled subscription pattern.

    ``*`` matches exactly one segment, ``**`` one or more; ``"**"`` alone matches every event.
    A pattern without wildcards is *exact* and is looked up by dictionary, never by regex.
    """

    text: str
    exact: bool
    _regex: re.Pattern[str] | None

    def matches(self, name: str) -> bool:
        """True if the event *name* matches this pattern."""
        if self._regex is None:
            return name == self.text
        return self._regex.fullmatch(name) is not None


@lru_cache(maxsize=1024)
def compile_pattern(text: str) -> Pattern:
    """Compile a subscription pattern; raise ``InvalidEventNameError`` if it is malformed."""
    if not isinstance(text, str):
        raise TypeError(f"pattern must be a str, got {type(text).__name__}")
    segments = text.split(":")
    if all(_SEGMENT_ONLY.fullmatch(s) for s in segments):
        return Pattern(text, exact=True, _regex=None)
    parts: list[str] = []
    for segment in segments:
        if segment == "*":
            parts.append(_SEGMENT)
        elif segment == "**":
            parts.append(rf"{_SEGMENT}(?::{_SEGMENT})*")
        elif _SEGMENT_ONLY.fullmatch(segment):
            parts.append(re.escape(segment))
        else:
            raise InvalidEventNameError(
                f"invalid pattern {text!r}: {_RULES}; '*' (one segment) and '**' (one or more) "
                "may stand only as whole segments"
            )
    return Pattern(text, exact=False, _regex=re.compile(":".join(parts)))
