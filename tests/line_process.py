"""A script run as a child process that the test talks to by lines: it reads the child's
stdout on a thread into a queue, so every wait for a line is bounded (no sleeping)."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent


class LineProcess:
    """``python <script> <args>`` in the repository; stderr goes to *err_path*."""

    def __init__(self, script: Path, args: list[str], err_path: Path, *, name: str) -> None:
        self.name = name
        self.err_path = err_path
        self._err: IO[str] = err_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            cwd=REPO,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """Read lines until one starts with *prefix*; return the rest of it, stripped."""
        return self.expect_any(prefix, timeout=timeout)[1]

    def expect_any(self, *prefixes: str, timeout: float = 30.0) -> tuple[str, str]:
        """Read lines until one starts with one of *prefixes*; return (prefix, rest)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no {prefixes} line within {timeout} s; stdout tail: "
                    f"{self.lines[-5:]}; stderr: {self.stderr()[-2000:]}"
                ) from None
            if line is None:
                self.proc.wait()
                raise AssertionError(
                    f"{self.name} exited (rc={self.proc.returncode}) before printing "
                    f"{prefixes}; stdout tail: {self.lines[-5:]}; stderr: {self.stderr()[-2000:]}"
                )
            self.lines.append(line)
            for prefix in prefixes:
                if line.startswith(prefix):
                    return prefix, line[len(prefix) :].strip()

    def stop(self, timeout: float = 30.0) -> None:
        """Send ``stop`` on stdin; wait for its ``done`` line and exit status 0."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.expect("done", timeout)
        rc = self.proc.wait(timeout)
        assert rc == 0, f"{self.name}: rc {rc}: {self.stderr()[-2000:]}"

    def kill(self) -> None:
        """SIGKILL and reap (an unreaped child would still look alive)."""
        self.proc.kill()
        self.proc.wait()

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self._err):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
