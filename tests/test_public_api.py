"""The public API (anyio style): explicit __all__ lists that say exactly what is public."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

import eventbus

PUBLIC_MODULES = [
    "eventbus",
    "eventbus.exceptions",
    "eventbus.retry",
    "eventbus.signals",
    "eventbus.testing",
    "eventbus.stores",
    "eventbus.codec",
    "eventbus.otel",
]

#: The documented names that code outside this repository relies on.
CONTRACT_NAMES = [
    "EventBus",
    "Event",
    "RetryPolicy",
    "DeadLetter",
    "Delivery",
    "EventBusError",
    "BusClosedError",
]


def _public_names(module: ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }


def test_all_lists_exactly_the_public_names() -> None:
    """eventbus.__all__ holds every public non-module name of the package, and nothing else."""
    assert set(eventbus.__all__) == _public_names(eventbus)


def test_all_is_sorted_without_duplicates() -> None:
    """eventbus.__all__ is sorted and names each object once."""
    assert eventbus.__all__ == sorted(set(eventbus.__all__))


@pytest.mark.parametrize("name", eventbus.__all__)
def test_every_public_name_is_importable(name: str) -> None:
    """`from eventbus import <name>` works for every name in __all__."""
    namespace: dict[str, object] = {}
    exec(f"from eventbus import {name}", namespace)
    assert namespace[name] is getattr(eventbus, name)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_name_in_all_exists(module_name: str) -> None:
    """Every name in a public module's __all__ is defined by that module."""
    module = importlib.import_module(module_name)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_module_all_is_sorted(module_name: str) -> None:
    """Each public module's __all__ is sorted and free of duplicates."""
    module = importlib.import_module(module_name)
    assert list(module.__all__) == sorted(set(module.__all__))


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_contract_names_are_exported(name: str) -> None:
    """The documented contract names are in eventbus.__all__."""
    assert name in eventbus.__all__


@pytest.mark.parametrize("name", eventbus.__all__)
def test_exported_objects_come_from_eventbus(name: str) -> None:
    """Every exported object is defined inside eventbus, not re-exported from a dependency."""
    assert getattr(eventbus, name).__module__.startswith("eventbus")


def test_py_typed_marker_exists() -> None:
    """The package ships a py.typed marker so type checkers read its annotations."""
    assert (Path(eventbus.__file__).parent / "py.typed").is_file()
