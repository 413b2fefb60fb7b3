"""Ports and HTTP for the tests that start servers as child processes."""

from __future__ import annotations

import json
import random
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


#: Where :func:`server_port` looks, below the kernel's ephemeral ports (see there).
_SERVER_PORTS_FROM = 20000
_EPHEMERAL_FROM = 32768  # Linux's default when /proc does not say


def _ephemeral_from() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _EPHEMERAL_FROM


def server_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test may stop and start again, taken below
    the kernel's ephemeral range.

    A port from :func:`free_port` is an ephemeral one, and while its server is down a client
    that keeps reconnecting to it may be given that very port as its own source port: on
    Linux the connection then connects to itself, and holds the port, so the restarted
    server fails with "address in use". A port no client is ever given avoids that."""
    upper = _ephemeral_from()
    lower = min(_SERVER_PORTS_FROM, max(1024, upper // 2))
    for _ in range(200):
        port = random.randrange(lower, upper)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()  # a crowded range: an ephemeral port still works, restarts aside


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
