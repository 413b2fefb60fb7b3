"""Every ```python block in docs/*.md runs as written; links resolve; docs/api.md names every
public name."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
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
