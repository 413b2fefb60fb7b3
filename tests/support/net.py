"""Ports and HTTP for the tests that start servers as child processes."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from tests.support.children import ChildProcess

#: Seconds for a child server to import what it needs and listen.
STARTUP_DEADLINE = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_listening(child: ChildProcess, port: int, timeout: float = STARTUP_DEADLINE) -> None:
    """Try to connect until the child accepts on *port*, exits, or *timeout* passes.

    Between attempts the loop waits on the process itself (briefly), which also notices a
    server that exited instead of starting: then the error shows what it printed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        try:
            child.proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        child.wait()
        raise AssertionError(f"{child.name} exited with {child.proc.returncode}:\n{child.output()}")
    raise AssertionError(f"{child.name} did not listen on port {port} within {timeout} s")


def call(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """One HTTP request; returns the status and the decoded JSON body, errors included."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())
