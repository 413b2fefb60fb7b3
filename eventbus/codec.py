"""The JSON codec that durable stores use for event payloads: JSON text only, stdlib only.

:meth:`JsonCodec.encode` turns a payload into ``(type_name, json_text)``;
:meth:`JsonCodec.decode` turns that pair back into an equal payload. The rules:

* **Plain payloads** (``type_name is None``) are strict JSON: ``dict`` with ``str`` keys,
  ``list``, ``str``, ``int``, finite ``float``, ``bool``, ``None``. A ``tuple`` is written as a
  list and comes back as a ``list``: the one lossy case. Anything else (sets, bytes, datetimes,
  objects, non-``str`` keys, NaN or infinite floats) is a ``TypeError`` naming the type and its
  path, e.g. ``payload['items'][2]``.
* **Typed payloads** are instances of registered classes, stored under a type name (default
  ``f"{cls.__module__}.{cls.__qualname__}"``). A dataclass is registered on its first encode;
  other classes are registered with ``encode`` (instance -> JSON value) and ``decode`` functions.
* A dataclass is written as a JSON object of its ``init`` fields (shallow ``fields()``). Values
  may be JSON values, nested dataclasses, lists, tuples and ``str``-keyed dicts of those,
  ``datetime``/``date`` (ISO 8601), ``Decimal`` and ``UUID`` (text) and ``Enum`` members (their
  value). Decoding reads ``typing.get_type_hints(cls)`` and rebuilds nested dataclasses, those
  scalar types, ``list[X]``, ``dict[str, X]`` and ``X | None``; any other annotation (``Any``,
  ``int | str``, ``tuple[...]`` ...) gets the JSON value as it is, so annotate precisely.
* Only registered classes decode. No module or class is ever looked up by a name read from the
  stored data, so a database cannot make the process import or run code.

Thread-safety: a :class:`JsonCodec` may be shared by any number of threads; its registry is
guarded by a lock, and encode/decode functions run outside that lock.
"""

from __future__ import annotations

import json
import math
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints
from uuid import UUID

from eventbus.exceptions import CodecError, PayloadTooLargeError

__all__ = ["CodecError", "DEFAULT_MAX_SIZE", "JsonCodec", "MAX_DEPTH", "PayloadTooLargeError"]  # noqa: RUF022 - sorted as the public API test checks

T = TypeVar("T")

_ROOT = "payload"
_TEXT_TYPES: dict[type, Callable[[str], Any]] = {
    datetime: datetime.fromisoformat,
    date: date.fromisoformat,
    Decimal: Decimal,
    UUID: UUID,
}


# --- encoding ------------------------------------------------------------------------------------


#: How deeply lists, dicts and dataclasses may nest in a payload: far beyond any domain event,
#: and far below the interpreter's recursion limit.
MAX_DEPTH = 100

#: The default largest payload a codec encodes, in bytes of JSON text: 1 MiB. A durable row or
#: a stream entry that size is already a sign that the payload should be a reference (an id, a
#: URL) to data kept elsewhere.
DEFAULT_MAX_SIZE = 1024 * 1024

Scalar = Callable[[Any, str, list[int]], Any]


def _walk(value: object, path: str, scalar: Scalar, parents: list[int]) -> Any:
    """*value* as a JSON value: lists, tuples and dicts walked here, everything else by *scalar*.

    *parents* holds the ids of the containers on the path to *value*, so that a cycle is a
    ``TypeError`` naming where it closes, not a ``RecursionError``.
    """
    if isinstance(value, list | tuple | dict):
        _enter(value, path, parents)
        try:
            if isinstance(value, dict):
                for key in value:
                    if not isinstance(key, str):
                        kind = type(key).__name__
                        raise TypeError(f"{path}: dict key {key!r} of type {kind} is not a str")
                return {
                    key: _walk(item, f"{path}[{key!r}]", scalar, parents)
                    for key, item in value.items()
                }
            return [_walk(item, f"{path}[{i}]", scalar, parents) for i, item in enumerate(value)]
        finally:
            parents.pop()
    return scalar(value, path, parents)


def _enter(container: object, path: str, parents: list[int]) -> None:
    """Push *container* onto *parents*; ``TypeError`` for a cycle or too deep a structure."""
    if id(container) in parents:
        raise TypeError(f"{path}: cyclic reference (a container that contains itself)")
    if len(parents) >= MAX_DEPTH:
        raise TypeError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    parents.append(id(container))


def _plain_scalar(value: object, path: str, parents: list[int]) -> Any:
    """*value* itself if it is a JSON scalar; ``TypeError`` otherwise."""
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"{path}: float {value!r} is not allowed in strict JSON")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    message = f"{path}: object of type {type(value).__qualname__} is not JSON serializable"
    if path == _ROOT and type(value).__module__ != "builtins":
        message += "; register its class with JsonCodec.register(cls, encode=..., decode=...)"
    raise TypeError(message)


def _field_scalar(value: object, path: str, parents: list[int]) -> Any:
    """A dataclass field value (or an item inside one) that is not a list, tuple or dict."""
    if is_dataclass(value) and not isinstance(value, type):
        return _encode_dataclass(value, path, parents)
    if isinstance(value, Enum):
        return _plain_scalar(value.value, path, parents)
    if isinstance(value, date):  # datetime included
        return value.isoformat()
    if isinstance(value, Decimal | UUID):
        return str(value)
    return _plain_scalar(value, path, parents)


def _encode_dataclass(obj: Any, path: str, parents: list[int]) -> dict[str, Any]:
    """The ``init`` fields of the dataclass instance *obj* as a JSON object."""
    _enter(obj, path, parents)
    try:
        return {
            f.name: _walk(getattr(obj, f.name), f"{path}.{f.name}", _field_scalar, parents)
            for f in fields(obj)
            if f.init
        }
    finally:
        parents.pop()


# --- decoding ------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in strict JSON")


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"stored payload is not valid JSON: {exc}") from exc
    except RecursionError:
        raise CodecError("stored payload is nested too deeply to decode") from None


def _rebuild(hint: Any, value: Any) -> Any:
    """*value* (decoded JSON) turned back into what the annotation *hint* describes."""
    if value is None:
        return None
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        return _rebuild(others[0], value) if len(others) == 1 else value
    if origin is list and len(args) == 1 and isinstance(value, list):
        return [_rebuild(args[0], item) for item in value]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {key: _rebuild(args[1], item) for key, item in value.items()}
    if isinstance(hint, type):
        return _rebuild_class(hint, value)
    return value


def _rebuild_class(cls: type, value: Any) -> Any:
    if is_dataclass(cls):
        return _decode_dataclass(cls, value)
    if issubclass(cls, Enum):
        return cls(value)
    parse = _TEXT_TYPES.get(cls)
    return value if parse is None else parse(value)


def _decode_dataclass(cls: type, value: Any) -> Any:
    """An instance of the dataclass *cls* built from the JSON object *value*."""
    if not isinstance(value, dict):
        raise TypeError(f"{cls.__qualname__} needs a JSON object, got {type(value).__name__}")
    hints = get_type_hints(cls)
    return cls(**{name: _rebuild(hints.get(name, Any), item) for name, item in value.items()})


# --- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One registered class; ``encode``/``decode`` are ``None`` for the dataclass defaults."""

    cls: type
    name: str
    encode: Callable[[Any], Any] | None
    decode: Callable[[Any], Any] | None

    def to_json(self, obj: object) -> Any:
        return _encode_dataclass(obj, _ROOT, []) if self.encode is None else self.encode(obj)

    def from_json(self, value: Any) -> Any:
        return _decode_dataclass(self.cls, value) if self.decode is None else self.decode(value)


def _check_registration(cls: object, encode: object, decode: object) -> None:
    if not isinstance(cls, type):
        raise TypeError(f"register() takes a class, got an object of type {type(cls).__name__}")
    if (encode is None) != (decode is None):
        raise TypeError(f"register {cls.__qualname__} with both encode and decode, or neither")
    if encode is None and not is_dataclass(cls):
        raise TypeError(
            f"{cls.__qualname__} is not a dataclass: register it with encode= and decode="
        )


class JsonCodec:
    """Encodes payloads to JSON text and back; only registered classes decode.

    *max_size* bounds the JSON text of one payload, in bytes (default
    :data:`DEFAULT_MAX_SIZE`, 1 MiB; ``None``: no bound); :meth:`encode` raises
    :class:`~eventbus.exceptions.PayloadTooLargeError` above it, so a store or transport
    refuses the event before writing anything.

    Thread-safe: registration, encoding and decoding may run from any threads at once.
    """

    def __init__(self, *, max_size: int | None = DEFAULT_MAX_SIZE) -> None:
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1
        ):
            raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")
        self.max_size = max_size
        self._lock = threading.Lock()
        self._by_name: dict[str, _Entry] = {}
        self._by_class: dict[type, _Entry] = {}

    def register(
        self,
        cls: type[T],
        *,
        name: str | None = None,
        encode: Callable[[T], Any] | None = None,
        decode: Callable[[Any], T] | None = None,
    ) -> type[T]:
        """Make *cls* known under *name* (default ``f"{cls.__module__}.{cls.__qualname__}"``).

        Returns *cls*, so ``@codec.register`` works as a decorator. Dataclasses need no
        ``encode``/``decode``; other classes need both. Registering a class again with the same
        settings (or with none: ``register(cls)``) is a no-op. Raises ``TypeError`` for a
        non-class, a lone ``encode`` or ``decode``, or a non-dataclass without them, and
        ``ValueError`` when the class is registered with other settings or *name* is taken.
        """
        _check_registration(cls, encode, decode)
        with self._lock:
            existing = self._by_class.get(cls)
            if name is None:
                name = existing.name if existing else f"{cls.__module__}.{cls.__qualname__}"
            entry = _Entry(cls, name, encode, decode)
            if existing is not None and existing != entry:
                raise ValueError(f"{cls.__qualname__} is already registered as {existing.name!r}")
            taken = self._by_name.get(name)
            if taken is not None and taken.cls is not cls:
                raise ValueError(f"type name {name!r} is already taken by {taken.cls.__qualname__}")
            self._by_name[name] = self._by_class[cls] = entry
        return cls

    def encode(self, payload: object) -> tuple[str | None, str]:
        """``(type name, JSON text)``; the type name is ``None`` for a plain JSON payload.

        An unregistered dataclass instance registers its class first. Raises ``TypeError``,
        naming the offending type and its path, for anything that cannot round-trip faithfully
        (see the module docstring), a cyclic structure or one nested deeper than
        :data:`MAX_DEPTH`; ``PayloadTooLargeError`` (a ``ValueError``) above ``max_size``; and
        ``ValueError`` if an unregistered dataclass's default name is taken by another class.
        """
        entry = self._entry_for(type(payload))
        value = payload if entry is None else entry.to_json(payload)
        # ensure_ascii (json's default): the text's length is its size in bytes.
        text = json.dumps(_walk(value, _ROOT, _plain_scalar, []), allow_nan=False)
        if self.max_size is not None and len(text) > self.max_size:
            raise PayloadTooLargeError(
                f"payload is {len(text):,} bytes of JSON, above the codec's max_size of "
                f"{self.max_size:,}: emit a reference (an id, a URL) to data kept elsewhere, "
                "or raise JsonCodec(max_size=...)"
            )
        return (None if entry is None else entry.name), text

    def decode(self, type_name: str | None, text: str) -> Any:
        """The payload that :meth:`encode` turned into ``(type_name, text)``.

        Raises :class:`CodecError` for invalid JSON, an unknown type name, or when the class's
        decode function or dataclass constructor fails (chained as ``__cause__``).
        """
        value = _loads(text)
        if type_name is None:
            return value
        with self._lock:
            entry = self._by_name.get(type_name)
        if entry is None:
            raise CodecError(
                f"unknown type name {type_name!r}: register the class with "
                "JsonCodec.register() before decoding"
            )
        try:
            return entry.from_json(value)
        except Exception as exc:
            raise CodecError(f"cannot rebuild {type_name!r} from stored JSON: {exc}") from exc

    def _entry_for(self, cls: type) -> _Entry | None:
        """The registry entry for *cls*, registering a dataclass on first sight."""
        with self._lock:
            entry = self._by_class.get(cls)
        if entry is None and is_dataclass(cls):
            self.register(cls)
            with self._lock:
                entry = self._by_class[cls]
        return entry
