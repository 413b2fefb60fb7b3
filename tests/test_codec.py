"""The JSON codec for durable stores: faithful round trips, strict errors, registered types only."""

from __future__ import annotations

import enum
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

import eventbus.codec
from eventbus.codec import CodecError, JsonCodec, PayloadTooLargeError
from eventbus.exceptions import EventBusError


class Status(enum.Enum):
    NEW = "new"
    PAID = "paid"


class Shape(enum.Enum):
    POINT = (0, 0)


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class LineItem:
    sku: str
    quantity: int
    price: Decimal


@dataclass
class Address:
    city: str
    zip_code: str | None = None


@dataclass
class Order:
    id: UUID
    placed_at: datetime
    ship_on: date
    status: Status
    priority: Priority
    items: list[LineItem]
    totals: dict[str, Decimal]
    address: Address
    billing: Address | None = None
    note: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Loose:
    anything: Any
    either: int | str
    numbers: list[int]
    table: dict[str, int]


@dataclass
class Counted:
    words: list[str]
    count: int = field(init=False)

    def __post_init__(self) -> None:
        self.count = len(self.words)


@dataclass
class Tagged:
    tags: Any


class Money:
    """A plain class: equal when amount and currency are equal."""

    def __init__(self, amount: Decimal, currency: str) -> None:
        self.amount = amount
        self.currency = currency

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.amount, self.currency) == (
            other.amount,
            other.currency,
        )

    __hash__ = None  # type: ignore[assignment]


def money_to_json(money: Money) -> dict[str, str]:
    return {"amount": str(money.amount), "currency": money.currency}


def money_from_json(value: Any) -> Money:
    return Money(Decimal(value["amount"]), value["currency"])


@pytest.fixture
def codec() -> JsonCodec:
    """A fresh codec with nothing registered."""
    return JsonCodec()


def make_order() -> Order:
    return Order(
        id=UUID("12345678-1234-5678-1234-567812345678"),
        placed_at=datetime(2024, 5, 17, 9, 30, 15, 123456, tzinfo=UTC),
        ship_on=date(2024, 5, 20),
        status=Status.PAID,
        priority=Priority.HIGH,
        items=[LineItem("A-1", 2, Decimal("9.99")), LineItem("B-2", 1, Decimal("0.10"))],
        totals={"net": Decimal("20.08"), "tax": Decimal("3.8152")},
        address=Address("Berlin", "10115"),
        billing=Address("Paris"),
        tags=["gift", "express"],
    )


# --- plain payloads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        None,
        True,
        0,
        -7,
        10**30,
        1.5,
        -0.0,
        "",
        "héllo \u2603 \U0001f600",
        [],
        {},
        {"id": 42, "items": [{"sku": "A", "n": 1.25}, None, [True, False]], "note": "x"},
    ],
)
def test_plain_payload_round_trips(codec: JsonCodec, payload: object) -> None:
    """A plain JSON payload encodes with no type name and decodes to an equal value."""
    type_name, text = codec.encode(payload)
    assert type_name is None
    assert codec.decode(type_name, text) == payload


def test_tuple_comes_back_as_list(codec: JsonCodec) -> None:
    """A tuple is the one lossy case: it is stored as a JSON array and decodes as a list."""
    assert codec.decode(*codec.encode({"pair": (1, (2, 3))})) == {"pair": [1, [2, 3]]}


def test_encode_output_is_valid_json_text(codec: JsonCodec) -> None:
    """The text encode returns parses with json.loads to the JSON form of the payload."""
    _, plain = codec.encode({"a": [1, 2.5, None]})
    _, typed = codec.encode(Address("Oslo"))
    assert json.loads(plain) == {"a": [1, 2.5, None]}
    assert json.loads(typed) == {"city": "Oslo", "zip_code": None}


# --- dataclasses -------------------------------------------------------------------------------


def test_nested_dataclass_round_trips_equal(codec: JsonCodec) -> None:
    """A dataclass with nested, datetime, date, Decimal, UUID, Enum, optional and list fields
    decodes equal to the original."""
    order = make_order()
    decoded = codec.decode(*codec.encode(order))
    assert decoded == order
    assert isinstance(decoded.items[0].price, Decimal)
    assert decoded.placed_at.tzinfo is not None


def test_dataclass_fields_are_stored_as_plain_json(codec: JsonCodec) -> None:
    """Dataclass field values are written as ISO text, strings and enum values."""
    _, text = codec.encode(make_order())
    stored = json.loads(text)
    assert stored["placed_at"] == "2024-05-17T09:30:15.123456+00:00"
    assert stored["ship_on"] == "2024-05-20"
    assert stored["totals"] == {"net": "20.08", "tax": "3.8152"}
    assert stored["id"] == "12345678-1234-5678-1234-567812345678"
    assert (stored["status"], stored["priority"]) == ("paid", 2)
    assert stored["billing"] == {"city": "Paris", "zip_code": None}


def test_dataclass_is_registered_on_first_encode(codec: JsonCodec) -> None:
    """An unregistered dataclass is registered under its module and qualified name at encode."""
    type_name, _ = codec.encode(Address("Rome"))
    assert type_name == f"{__name__}.Address"
    assert codec.decode(type_name, '{"city": "Rome"}') == Address("Rome")


def test_init_false_fields_are_recomputed_on_decode(codec: JsonCodec) -> None:
    """Fields with init=False are not stored; the constructor computes them again."""
    _, text = codec.encode(Counted(["a", "b"]))
    assert json.loads(text) == {"words": ["a", "b"]}
    assert codec.decode(f"{__name__}.Counted", text).count == 2


def test_other_annotations_receive_the_json_value(codec: JsonCodec) -> None:
    """Fields annotated Any or with a multi-type union get the decoded JSON value unchanged."""
    loose = Loose(anything={"k": [1]}, either="x", numbers=[1, 2], table={"a": 1})
    assert codec.decode(*codec.encode(loose)) == loose


def test_mismatched_container_json_is_passed_through(codec: JsonCodec) -> None:
    """Stored JSON that does not match a list or dict annotation is handed over as it is."""
    codec.register(Loose)
    text = '{"anything": 1, "either": 2, "numbers": {"a": 1}, "table": [1]}'
    decoded = codec.decode(f"{__name__}.Loose", text)
    assert (decoded.numbers, decoded.table) == ({"a": 1}, [1])


# --- registration ------------------------------------------------------------------------------


def test_registered_class_round_trips_through_its_functions(codec: JsonCodec) -> None:
    """A non-dataclass registered with encode and decode round-trips under its given name."""
    codec.register(Money, name="money", encode=money_to_json, decode=money_from_json)
    type_name, text = codec.encode(Money(Decimal("1.50"), "EUR"))
    assert type_name == "money"
    assert json.loads(text) == {"amount": "1.50", "currency": "EUR"}
    assert codec.decode(type_name, text) == Money(Decimal("1.50"), "EUR")


def test_register_works_as_a_decorator(codec: JsonCodec) -> None:
    """register returns the class unchanged, so it works as a plain decorator."""

    @codec.register
    @dataclass
    class Local:
        value: int

    assert codec.encode(Local(1))[0] == f"{__name__}.{Local.__qualname__}"


def test_dataclass_may_use_its_own_functions(codec: JsonCodec) -> None:
    """A dataclass registered with encode and decode uses them instead of its fields."""
    codec.register(Address, encode=lambda a: a.city, decode=Address)
    type_name, text = codec.encode(Address("Lima"))
    assert text == '"Lima"'
    assert codec.decode(type_name, text) == Address("Lima")


def test_registering_the_same_class_again_is_a_no_op(codec: JsonCodec) -> None:
    """Registering a class again, with the same name or none, keeps its first registration."""
    codec.register(Address, name="address")
    assert codec.register(Address) is Address
    assert codec.register(Address, name="address") is Address
    assert codec.encode(Address("Oslo"))[0] == "address"


def test_registering_a_class_under_another_name_is_a_value_error(codec: JsonCodec) -> None:
    """A class already known under one name cannot be registered under another."""
    codec.register(Address, name="address")
    with pytest.raises(ValueError, match="already registered as 'address'"):
        codec.register(Address, name="addr")


def test_taken_name_is_a_value_error(codec: JsonCodec) -> None:
    """Another class under a name that is taken is a ValueError."""
    codec.register(Address, name="shared")
    with pytest.raises(ValueError, match="'shared' is already taken by Address"):
        codec.register(LineItem, name="shared")


def test_non_dataclass_without_functions_is_a_type_error(codec: JsonCodec) -> None:
    """A plain class registered without encode and decode is a TypeError."""
    with pytest.raises(TypeError, match="Money is not a dataclass"):
        codec.register(Money)


@pytest.mark.parametrize(
    "functions", [{"encode": money_to_json}, {"decode": money_from_json}], ids=["encode", "decode"]
)
def test_lone_function_is_a_type_error(codec: JsonCodec, functions: dict[str, Any]) -> None:
    """encode without decode, or decode without encode, is a TypeError."""
    with pytest.raises(TypeError, match="both encode and decode"):
        codec.register(Money, **functions)


def test_registering_a_non_class_is_a_type_error(codec: JsonCodec) -> None:
    """register takes classes only, not instances."""
    with pytest.raises(TypeError, match="takes a class"):
        codec.register(Address("Oslo"))  # type: ignore[arg-type]


def test_concurrent_first_encodes_register_once(codec: JsonCodec) -> None:
    """Many threads encoding an unregistered dataclass at once all get the same type name."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        names = set(pool.map(lambda i: codec.encode(LineItem("x", i, Decimal(i)))[0], range(200)))
    assert names == {f"{__name__}.LineItem"}


# --- encode errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"items": [1, 2, {3}]}, "payload['items'][2]: object of type set is not JSON serial"),
        ([b"raw"], "payload[0]: object of type bytes is not JSON serializable"),
        ({"a": {"b": object()}}, "payload['a']['b']: object of type object is not JSON"),
        ({"a": {1: "x"}}, "payload['a']: dict key 1 of type int is not a str"),
        ({"x": float("nan")}, "payload['x']: float nan is not allowed in strict JSON"),
        ([[float("-inf")]], "payload[0][0]: float -inf is not allowed in strict JSON"),
        ({"at": datetime(2024, 1, 1)}, "payload['at']: object of type datetime is not JSON"),
        ({"status": Status.NEW}, "payload['status']: object of type Status is not JSON"),
    ],
    ids=["set", "bytes", "object", "int-key", "nan", "inf", "datetime", "enum"],
)
def test_unencodable_plain_value_names_type_and_path(
    codec: JsonCodec, payload: object, message: str
) -> None:
    """A value strict JSON cannot hold is a TypeError naming its type and path."""
    with pytest.raises(TypeError) as caught:
        codec.encode(payload)
    assert str(caught.value).startswith(message)


def test_unregistered_plain_class_is_a_type_error_suggesting_register(codec: JsonCodec) -> None:
    """An instance of an unregistered non-dataclass is a TypeError that says to register it."""
    with pytest.raises(TypeError, match=r"^payload: object of type Money .*JsonCodec\.register"):
        codec.encode(Money(Decimal(1), "EUR"))


def test_unencodable_dataclass_field_names_its_path(codec: JsonCodec) -> None:
    """A bad value inside a dataclass is reported with the field path."""
    with pytest.raises(TypeError, match=r"^payload\.tags\[1\]: object of type set"):
        codec.encode(Tagged(tags=["ok", {"bad"}]))


def test_non_json_enum_value_in_dataclass_is_a_type_error(codec: JsonCodec) -> None:
    """An Enum member whose value is not a JSON scalar cannot be stored faithfully."""
    with pytest.raises(TypeError, match=r"^payload\.tags: object of type tuple"):
        codec.encode(Tagged(tags=Shape.POINT))


def test_registered_encode_returning_non_json_is_a_type_error(codec: JsonCodec) -> None:
    """What a registered encode function returns must itself be strict JSON."""
    codec.register(Money, encode=lambda m: {"amount": m.amount}, decode=money_from_json)
    with pytest.raises(TypeError, match=r"^payload\['amount'\]: object of type Decimal"):
        codec.encode(Money(Decimal(1), "EUR"))


# --- decode errors -----------------------------------------------------------------------------


def test_unknown_type_name_is_a_codec_error(codec: JsonCodec) -> None:
    """A type name nobody registered is a CodecError that says to register the class."""
    with pytest.raises(CodecError, match=r"unknown type name 'os\.system'.*register"):
        codec.decode("os.system", '{"command": "true"}')


def test_codec_error_is_an_eventbus_value_error() -> None:
    """CodecError is caught by both ``except EventBusError`` and ``except ValueError``."""
    assert issubclass(CodecError, EventBusError)
    assert issubclass(CodecError, ValueError)


@pytest.mark.parametrize("text", ['{"a": 1', "", "nope", '{"a": NaN}', "[Infinity]"])
def test_corrupted_json_is_a_codec_error(codec: JsonCodec, text: str) -> None:
    """Text that is not strict JSON is a CodecError chained to the parser's error."""
    with pytest.raises(CodecError, match="not valid JSON") as caught:
        codec.decode(None, text)
    assert isinstance(caught.value.__cause__, ValueError)


def test_failing_decode_function_is_a_codec_error(codec: JsonCodec) -> None:
    """An exception in a registered decode function becomes a CodecError with it as the cause."""
    codec.register(Money, name="money", encode=money_to_json, decode=money_from_json)
    with pytest.raises(CodecError, match="cannot rebuild 'money'") as caught:
        codec.decode("money", '{"amount": "1"}')
    assert isinstance(caught.value.__cause__, KeyError)


def test_failing_dataclass_constructor_is_a_codec_error(codec: JsonCodec) -> None:
    """Stored fields the dataclass does not take are a CodecError caused by its TypeError."""
    codec.register(Address, name="address")
    with pytest.raises(CodecError, match="cannot rebuild 'address'") as caught:
        codec.decode("address", '{"city": "Oslo", "planet": "Earth"}')
    assert isinstance(caught.value.__cause__, TypeError)


def test_non_object_for_nested_dataclass_is_a_codec_error(codec: JsonCodec) -> None:
    """A stored non-object where a dataclass is annotated is a CodecError."""
    codec.register(Order, name="order")
    text = json.dumps({**json.loads(codec.encode(make_order())[1]), "address": "Oslo"})
    with pytest.raises(CodecError, match="Address needs a JSON object, got str"):
        codec.decode("order", text)


def test_bad_iso_text_is_a_codec_error(codec: JsonCodec) -> None:
    """A stored datetime that is not ISO 8601 text is a CodecError, not a silent string."""
    codec.register(Order, name="order")
    text = json.dumps({**json.loads(codec.encode(make_order())[1]), "placed_at": "yesterday"})
    with pytest.raises(CodecError, match="cannot rebuild 'order'"):
        codec.decode("order", text)


# --- the module --------------------------------------------------------------------------------


def test_module_source_never_mentions_pickle() -> None:
    """The codec's source does not contain the word pickle at all."""
    source = Path(eventbus.codec.__file__).read_text(encoding="utf-8")
    assert "pickle" not in source.lower()


def test_module_exports_exactly_the_public_names() -> None:
    """The codec exports its class, its errors and its two limits, nothing else."""
    assert eventbus.codec.__all__ == [
        "CodecError",
        "DEFAULT_MAX_SIZE",
        "JsonCodec",
        "MAX_DEPTH",
        "PayloadTooLargeError",
    ]


# --- limits: cycles, depth, size ----------------------------------------------------------------


def test_cyclic_dict_is_a_type_error_naming_where_it_closes(codec: JsonCodec) -> None:
    """A dict that contains itself is a TypeError with its path, not a RecursionError."""
    payload: dict[str, Any] = {"order": {"id": 1}}
    payload["order"]["self"] = payload
    with pytest.raises(TypeError, match=r"payload\['order'\]\['self'\]: cyclic"):
        codec.encode(payload)


def test_cyclic_list_is_a_type_error(codec: JsonCodec) -> None:
    """A list that contains itself is a TypeError."""
    payload: list[Any] = [1]
    payload.append(payload)
    with pytest.raises(TypeError, match="cyclic"):
        codec.encode(payload)


@dataclass
class Node:
    """A dataclass that can point at itself."""

    name: str
    next: Any = None


def test_cyclic_dataclass_is_a_type_error(codec: JsonCodec) -> None:
    """A dataclass whose field refers back to it is a TypeError."""
    node = Node("a")
    node.next = node
    with pytest.raises(TypeError, match="cyclic"):
        codec.encode(node)


def test_the_same_object_twice_is_not_a_cycle(codec: JsonCodec) -> None:
    """A value shared by two branches (not its own ancestor) encodes normally."""
    shared = {"sku": "A-1"}
    assert json.loads(codec.encode({"a": shared, "b": [shared]})[1]) == {
        "a": {"sku": "A-1"},
        "b": [{"sku": "A-1"}],
    }


def test_too_deep_a_payload_is_a_type_error(codec: JsonCodec) -> None:
    """A payload nested deeper than MAX_DEPTH is a TypeError, not a RecursionError."""
    payload: Any = "leaf"
    for _ in range(eventbus.codec.MAX_DEPTH + 1):
        payload = [payload]
    with pytest.raises(TypeError, match="nested deeper than"):
        codec.encode(payload)


def test_payload_at_max_depth_encodes(codec: JsonCodec) -> None:
    """A payload exactly MAX_DEPTH containers deep is accepted."""
    payload: Any = "leaf"
    for _ in range(eventbus.codec.MAX_DEPTH):
        payload = [payload]
    assert codec.encode(payload)[0] is None


def test_deeply_nested_stored_json_is_a_codec_error(codec: JsonCodec) -> None:
    """Stored JSON nested past the interpreter's limit decodes to CodecError."""
    with pytest.raises(CodecError, match="nested too deeply"):
        codec.decode(None, "[" * 100_000 + "]" * 100_000)


def test_payload_above_max_size_is_refused() -> None:
    """A payload whose JSON text exceeds max_size raises PayloadTooLargeError (a ValueError)."""
    codec = JsonCodec(max_size=100)
    with pytest.raises(PayloadTooLargeError, match="above the codec's max_size of 100"):
        codec.encode({"text": "x" * 100})
    with pytest.raises(ValueError, match="max_size"):
        codec.encode("y" * 101)


def test_payload_at_max_size_is_accepted() -> None:
    """A payload whose JSON text is exactly max_size bytes is accepted."""
    codec = JsonCodec(max_size=12)
    assert codec.encode("x" * 10) == (None, '"' + "x" * 10 + '"')


def test_default_max_size_refuses_a_ten_megabyte_string(codec: JsonCodec) -> None:
    """The default codec refuses a 10 MB string payload."""
    assert codec.max_size == eventbus.codec.DEFAULT_MAX_SIZE == 1024 * 1024
    with pytest.raises(PayloadTooLargeError):
        codec.encode("x" * 10_000_000)


def test_non_ascii_payload_is_measured_in_bytes() -> None:
    """Size counts the bytes of the JSON text, where non-ASCII text is escaped."""
    codec = JsonCodec(max_size=8)
    assert codec.encode("é")[1] == '"\\u00e9"'  # 8 bytes: fits
    with pytest.raises(PayloadTooLargeError):
        codec.encode("éé")  # 14 bytes


def test_max_size_none_means_unbounded() -> None:
    """max_size=None accepts any size."""
    assert len(JsonCodec(max_size=None).encode("x" * 2_000_000)[1]) == 2_000_002


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "big"])
def test_invalid_max_size_is_a_value_error(bad: object) -> None:
    """max_size must be a positive int or None."""
    with pytest.raises(ValueError, match="max_size"):
        JsonCodec(max_size=bad)  # type: ignore[arg-type]
