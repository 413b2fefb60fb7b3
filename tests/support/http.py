"""Polling a server started as a child process over HTTP, with httpx."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.support.children import ChildProcess

#: Bound on how long a poll waits for the state it looks for.
POLL_DEADLINE = 15.0
#: Between two requests the poll waits this long on the child's exit (noticing a crash).
POLL_PAUSE = 0.02


def poll_json(
    client: httpx.Client,
    url: str,
    until: Callable[[Any], bool],
    *,
    child: ChildProcess,
    timeout: float = POLL_DEADLINE,
) -> Any:
    """GET *url* until the decoded JSON body satisfies *until* and return it. Fails on a
    status other than 200, when *child* (the server) exits, or after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        response = client.get(url)
        assert response.status_code == 200, f"GET {url}: {response.status_code} {response.text}"
        body = response.json()
        if until(body):
            return body
        try:
            child.proc.wait(timeout=POLL_PAUSE)
        except subprocess.TimeoutExpired:
            continue
        child.wait()
        raise AssertionError(f"{child.name} exited with {child.proc.returncode}:\n{child.output()}")
    raise AssertionError(f"GET {url}: still {body!r} after {timeout} s")
