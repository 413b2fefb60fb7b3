"""Every ```python block in docs/*.md runs as written; links resolve; docs/api.md names every
public name; docs/logging-and-signals.md lists every log record the code can write."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OUTCOMES = ROOT / "eventbus" / "_outcomes.py"
SKIP_MARKER = "# not-run"
LINK = re.compile(r"\]\(([^)\s]+)\)")
PUBLIC_MODULES = (
    "eventbus",
    "eventbus.exceptions",
    "eventbus.retry",
    "eventbus.stores",
    "eventbus.codec",
    "eventbus.signals",
    "eventbus.testing",
    "eventbus.typing",
    "eventbus.otel",
    "eventbus.dashboard",
)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The ```python blocks of *path* as (line of the opening fence, code), in file order."""
    blocks: list[tuple[int, str]] = []
    start: int | None = None
    code: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if start is None:
            if stripped == "```python":
                start, code = number, []
        elif stripped == "```":
            blocks.append((start, "\n".join(code) + "\n"))
            start = None
        else:
            code.append(line)
    assert start is None, f"{path.name}:{start}: unclosed ```python block"
    return blocks


def runnable_blocks() -> list[object]:
    """One pytest param per block that does not start with the skip marker, id'd file:line."""
    params = []
    for path in sorted(DOCS.glob("*.md")):
        for line, code in python_blocks(path):
            if code.lstrip().partition("\n")[0].strip() == SKIP_MARKER:
                continue
            params.append(pytest.param(code, id=f"{path.name}:{line}"))
    return params


@pytest.mark.parametrize("code", runnable_blocks())
def test_doc_example_runs(code: str, tmp_path: Path) -> None:
    """The python block at this file:line runs as a script in a fresh interpreter and exits 0."""
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_api_page_names_every_public_name() -> None:
    """docs/api.md mentions each name exported by the public modules' __all__ lists."""
    api = (DOCS / "api.md").read_text()
    missing = [
        f"{module}.{name}"
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
        if f"`{name}" not in api and f"{name}(" not in api
    ]
    assert missing == []


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of *path* (code blocks skipped, repeats numbered)."""
    anchors: set[str] = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def test_relative_links_resolve() -> None:
    """Each relative link in docs/*.md names an existing file and, if given, one of its headings."""
    broken = []
    for path in sorted(DOCS.glob("*.md")):
        for target in LINK.findall(path.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            missing_anchor = (
                linked.exists()
                and linked.suffix == ".md"
                and bool(anchor)
                and anchor not in heading_anchors(linked)
            )
            if not linked.exists() or missing_anchor:
                broken.append(f"{path.name}: {target}")
    assert broken == []


# -- log records: docs/logging-and-signals.md vs eventbus/_outcomes.py -------------------------

#: structlog's bound-logger methods that write a record whose first argument is the event name.
LOG_LEVELS = frozenset(
    {"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "msg"}
)
#: Bound-logger methods that return another logger (``self._log.bind(...).info(...)``).
LOGGER_FACTORIES = frozenset({"bind", "new", "unbind", "try_unbind", "opt"})


class _RecordFinder:
    """Finds, by parsing, every record name a module can log and the levels it logs it at.

    A record is logged by a call of a level method (``debug``, ``info``, ...) on a logger: an
    attribute or module name assigned from ``structlog.get_logger(...)``, a local alias of one,
    or ``getattr(logger, ...)``; or of a local name bound to such a method (``level =
    self._log.warning if ... else self._log.info``). The record name is that call's first
    argument (or ``event=``): a string literal, a module-level string constant, or a parameter
    of the enclosing method, which makes the method a helper whose callers
    (``self._left("handler.left_in_store", ...)``) name the record. Anything else is reported
    as unresolved, so a new way of logging fails the test instead of being skipped.
    """

    def __init__(self, source: str) -> None:
        self.tree = ast.parse(source)
        self.constants = {
            target.id: node.value.value
            for node in self.tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        self.logger_attrs: set[str] = set()
        self.logger_names: set[str] = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Assign | ast.AnnAssign) and self._is_get_logger(node.value):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute):
                        self.logger_attrs.add(target.attr)
                    elif isinstance(target, ast.Name):
                        self.logger_names.add(target.id)
        self.records: dict[str, set[str]] = {}
        self.unresolved: list[str] = []

    @staticmethod
    def _is_get_logger(value: ast.expr | None) -> bool:
        return (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute | ast.Name)
            and (value.func.attr if isinstance(value.func, ast.Attribute) else value.func.id)
            in {"get_logger", "getLogger", "wrap_logger"}
        )

    def _is_logger(self, node: ast.expr, aliases: set[str]) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr in self.logger_attrs
        if isinstance(node, ast.Name):
            return node.id in self.logger_names or node.id in aliases
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LOGGER_FACTORIES
            and self._is_logger(node.func.value, aliases)
        )

    def _levels_of(
        self, node: ast.expr, aliases: set[str], methods: dict[str, set[str]]
    ) -> set[str] | None:
        """The levels *node* (the function of a call) logs at, or None if not a level method."""
        if isinstance(node, ast.Attribute) and node.attr in LOG_LEVELS:
            return {node.attr} if self._is_logger(node.value, aliases) else None
        if isinstance(node, ast.Name):
            return methods.get(node.id)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and node.args
            and self._is_logger(node.args[0], aliases)
        ):
            level = node.args[1] if len(node.args) > 1 else None
            if not isinstance(level, ast.Constant):  # a level chosen at run time: unknown
                return set()
            return {level.value} if level.value in LOG_LEVELS else None
        if isinstance(node, ast.IfExp):
            body = self._levels_of(node.body, aliases, methods)
            orelse = self._levels_of(node.orelse, aliases, methods)
            if body is not None and orelse is not None:
                return body | orelse
        return None

    def _local_aliases(self, function: ast.AST) -> tuple[set[str], dict[str, set[str]]]:
        """Local names bound to a logger, and to a level method (with its levels)."""
        aliases: set[str] = set()
        methods: dict[str, set[str]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if self._is_logger(node.value, aliases):
                    aliases.update(names)
                levels = self._levels_of(node.value, aliases, methods)
                if levels is not None:
                    methods.update(dict.fromkeys(names, levels))
        return aliases, methods

    @staticmethod
    def _argument(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
        if len(call.args) > position and not isinstance(call.args[position], ast.Starred):
            return call.args[position]
        return next((k.value for k in call.keywords if k.arg == keyword), None)

    def _add(self, node: ast.expr | None, levels: set[str], where: int) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            self.records.setdefault(node.value, set()).update(levels)
        elif isinstance(node, ast.Name) and node.id in self.constants:
            self.records.setdefault(self.constants[node.id], set()).update(levels)
        else:
            shown = ast.unparse(node) if node is not None else "nothing"
            self.unresolved.append(f"line {where}: a record named by {shown}")

    def find(self) -> dict[str, set[str]]:
        enclosing: dict[ast.AST, ast.FunctionDef | ast.AsyncFunctionDef | None] = {}
        scopes: list[tuple[ast.AST, ast.FunctionDef | ast.AsyncFunctionDef | None]] = [
            (self.tree, None)
        ]
        while scopes:
            node, function = scopes.pop()
            for child in ast.iter_child_nodes(node):
                enclosing[child] = function
                inner = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else None
                scopes.append((child, inner or function))
        local = {None: (set(), {})} | {
            f: self._local_aliases(f) for f in set(enclosing.values()) if f is not None
        }
        # helper method name -> (position of the parameter naming the record, its name, levels)
        helpers: dict[str, tuple[int, str, set[str]]] = {}
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call):
                continue
            function = enclosing[node]
            levels = self._levels_of(node.func, *local[function])
            if levels is None:
                continue
            name = self._argument(node, 0, "event")
            params = [] if function is None else [a.arg for a in function.args.args]
            if function is not None and isinstance(name, ast.Name) and name.id in params:
                position = params.index(name.id) - (params[:1] == ["self"])
                helpers[function.name] = (position, name.id, levels)
            else:
                self._add(name, levels, node.lineno)
        called: set[str] = set()
        for node in ast.walk(self.tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "self"
                and node.func.attr in helpers
            ):
                called.add(node.func.attr)
                position, keyword, levels = helpers[node.func.attr]
                self._add(self._argument(node, position, keyword), levels, node.lineno)
        for helper in sorted(set(helpers) - called):
            self.unresolved.append(f"{helper}(): logs a record its callers name, but none calls it")
        return self.records


def logged_records() -> dict[str, set[str]]:
    """Every record name eventbus/_outcomes.py can log, with the levels it logs it at."""
    finder = _RecordFinder(OUTCOMES.read_text())
    records = finder.find()
    assert finder.unresolved == [], (
        "eventbus/_outcomes.py logs records whose names this test cannot read; teach "
        f"_RecordFinder the new shape: {finder.unresolved}"
    )
    return records


def documented_records() -> dict[str, str]:
    """The record table of docs/logging-and-signals.md: record name -> its level cell."""
    rows: dict[str, str] = {}
    in_table = False
    for line in (DOCS / "logging-and-signals.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if "|" in line else []
        if cells[:2] == ["`event`", "level"]:
            in_table = True
        elif in_table and not cells:
            break
        elif in_table and re.fullmatch(r"`[\w.]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1]
    assert rows, "docs/logging-and-signals.md has no table headed | `event` | level | ..."
    return rows


def test_log_record_table_lists_exactly_the_records_the_code_writes() -> None:
    """The docs' log-record table names exactly the records eventbus/_outcomes.py can write."""
    logged, documented = set(logged_records()), set(documented_records())
    assert len(logged) >= 10, f"the parser found too few records to be trusted: {logged}"
    assert {
        "written but not documented": sorted(logged - documented),
        "documented but never written": sorted(documented - logged),
    } == {"written but not documented": [], "documented but never written": []}


def test_log_record_table_gives_the_levels_the_code_uses() -> None:
    """The docs' log-record table gives every level eventbus/_outcomes.py writes each record at."""
    documented = documented_records()
    wrong = {
        name: sorted(levels)
        for name, levels in logged_records().items()
        if name in documented
        and not all(re.search(rf"\b{lv}\b", documented[name]) for lv in levels)
    }
    assert wrong == {}
