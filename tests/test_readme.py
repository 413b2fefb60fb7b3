"""The README's quickstart is the first thing users run: it must work as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    """The first python block of the README runs as a script and prints the dead letter."""
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert block is not None
    script = tmp_path / "quickstart.py"
    script.write_text(block.group(1))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (
        "__main__.update_inventory 5 ConnectionError: inventory service unreachable"
        in result.stdout
    )
