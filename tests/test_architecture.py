"""Import boundaries, read from the source with ast: each dependency has one importer."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import eventbus

PACKAGE = Path(eventbus.__file__).resolve().parent
MODULES = sorted(PACKAGE.rglob("*.py"))


@dataclass(frozen=True)
class Import:
    """One imported module, and whether the import only runs for type checkers."""

    module: str
    type_checking_only: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _resolve_from(path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _dynamic_import(node: ast.Call) -> str | None:
    """The module named by `importlib.import_module("x")` or `__import__("x")`, if constant."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in {"import_module", "__import__"} or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_of(path: Path) -> list[Import]:
    """Every import in the module at *path*: nested, guarded and constant dynamic ones too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            guarded.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    out: list[Import] = []
    for node in ast.walk(tree):
        only_typing = id(node) in guarded
        if isinstance(node, ast.Import):
            out.extend(Import(alias.name, only_typing) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(path, node)
            out.append(Import(base, only_typing))
            # `from eventbus import signals` imports the submodule eventbus.signals.
            out.extend(Import(f"{base}.{alias.name}", only_typing) for alias in node.names)
        elif isinstance(node, ast.Call) and (name := _dynamic_import(node)) is not None:
            out.append(Import(name, only_typing))
    return out


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def importers_of(package: str) -> set[str]:
    """Paths (relative to eventbus/) of the modules that import *package* at all."""
    return {
        str(path.relative_to(PACKAGE))
        for path in MODULES
        if any(_in(i.module, package) for i in imports_of(path))
    }


def _own_imports(path: Path, *, runtime: bool) -> set[str]:
    return {
        i.module
        for i in imports_of(path)
        if _in(i.module, "eventbus") and (not runtime or not i.type_checking_only)
    }


def test_package_has_modules_to_check() -> None:
    """The checks below read the real package, with its core modules present."""
    names = {str(p.relative_to(PACKAGE)) for p in MODULES}
    assert {"__init__.py", "_outcomes.py", "signals.py", "retry.py", "exceptions.py"} <= names


def test_import_reader_sees_type_checking_blocks() -> None:
    """The reader marks imports under `if TYPE_CHECKING:` as type-checking only."""
    found = {i.module: i.type_checking_only for i in imports_of(PACKAGE / "typing.py")}
    assert found["eventbus.stores._model"] is True
    assert found["collections.abc"] is False


@pytest.mark.parametrize(
    ("dependency", "owner"),
    [
        ("structlog", "_outcomes.py"),
        ("blinker", "signals.py"),
        ("tenacity", "retry.py"),
        ("redis", "transports/redis_streams.py"),
        ("opentelemetry", "otel.py"),
        ("psycopg", "stores/postgres.py"),
        ("psycopg_pool", "stores/postgres.py"),
        ("pika", "transports/rabbitmq.py"),
        ("flask", "dashboard/__init__.py"),
    ],
)
def test_dependency_has_a_single_importer(dependency: str, owner: str) -> None:
    """Each third-party dependency is imported by exactly one module."""
    assert importers_of(dependency) == {owner}


@pytest.mark.parametrize("leaf", ["exceptions.py", "_event.py"])
def test_leaf_modules_import_nothing_of_ours(leaf: str) -> None:
    """The leaf modules import nothing from eventbus, not even for type checkers."""
    assert _own_imports(PACKAGE / leaf, runtime=False) == set()


def test_typing_imports_only_the_event_records_at_runtime() -> None:
    """At run time typing.py imports only eventbus._event (for DeliveryState)."""
    assert _own_imports(PACKAGE / "typing.py", runtime=True) <= {
        "eventbus._event",
        "eventbus._event.DeliveryState",
    }


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, type-checking imports included."""
    names = {_module_name(path) for path in MODULES}
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        targets = set()
        for imported in _own_imports(path, runtime=False):
            # `from eventbus import signals` names eventbus.signals; `from eventbus._x import y`
            # names eventbus._x.y, which is not a module: keep the longest module prefix.
            module = imported
            while module not in names and "." in module:
                module = module.rsplit(".", 1)[0]
            if module in names:
                targets.add(module)
        graph[_module_name(path)] = targets - {_module_name(path)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in *graph* (as a path that ends where it starts), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for target in sorted(graph[node]):
                if target == start:
                    return [*path, start]
                if target not in path and target not in done:
                    stack.append((target, [*path, target]))
        done.add(start)
    return None


# Packages import their submodules to re-export them; that is not a cycle between parts.
_REEXPORTS = {"eventbus", "eventbus.stores", "eventbus.transports"}


def test_imports_have_no_cycles() -> None:
    """No module of ours imports, directly or through others, a module that imports it
    (type-checking imports count: the arrows point one way)."""
    graph = {m: t - _REEXPORTS for m, t in _graph().items() if m not in _REEXPORTS}
    assert _cycle(graph) is None


def test_cycle_finder_finds_a_cycle() -> None:
    """The cycle check itself fails on a graph with a cycle."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_exceptions_imports_nothing_of_ours() -> None:
    """exceptions.py imports nothing from eventbus, not even for type checkers."""
    assert _own_imports(PACKAGE / "exceptions.py", runtime=False) == set()


def test_typing_imports_only_data_records_for_type_checkers() -> None:
    """typing.py may import the data records (eventbus._event, eventbus.stores._model) under
    TYPE_CHECKING, and nothing else of ours."""
    own = _own_imports(PACKAGE / "typing.py", runtime=False)
    assert own
    assert all(
        _in(module, "eventbus._event") or _in(module, "eventbus.stores._model") for module in own
    )


def test_init_holds_only_imports_and_all() -> None:
    """eventbus/__init__.py is a docstring, imports and __all__: re-exports only."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    body = tree.body
    assert ast.get_docstring(tree) is not None
    unexpected = []
    for node in body[1:]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["__all__"]
        ) or (isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "__all__"):
            continue
        unexpected.append(ast.dump(node)[:80])
    assert unexpected == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_pickle(path: Path) -> None:
    """No module imports pickle: events and dead letters are never unpickled."""
    assert not any(_in(i.module, "pickle") for i in imports_of(path))
