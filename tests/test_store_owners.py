"""Owner ids and the dead-owner check that lets recovery take over a crashed process's work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from eventbus.stores import _model
from eventbus.stores._model import new_owner, owner_is_dead


def test_owner_id_names_this_host_and_process() -> None:
    """An owner id starts with this host and this process's pid."""
    host, pid, unique = new_owner().split(":")
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert unique


def test_owner_ids_are_unique() -> None:
    """Two owner ids of one process differ."""
    assert new_owner() != new_owner()


def test_this_process_is_not_dead() -> None:
    """An owner id of the calling process is never taken for dead."""
    assert owner_is_dead(new_owner()) is False


def test_a_reaped_process_is_dead() -> None:
    """The owner id of a process that exited and was reaped is dead."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(child.stdout)
    assert owner_is_dead(f"{socket.gethostname()}:{pid}:x") is True


def test_a_live_process_is_not_dead() -> None:
    """The owner id of a running process on this host is not dead."""
    with subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE) as child:
        try:
            assert owner_is_dead(f"{socket.gethostname()}:{child.pid}:x") is False
        finally:
            child.communicate(b"\n")


def test_an_owner_on_another_host_is_left_to_its_lease() -> None:
    """An owner on another host is never declared dead by pid: only its lease can expire."""
    assert owner_is_dead("some-other-host:1:x") is False


@pytest.mark.parametrize("owner", ["", "no-colons", f"{socket.gethostname()}:notapid:x"])
def test_a_malformed_owner_is_not_dead(owner: str) -> None:
    """An owner id that does not parse is left to its lease, not declared dead."""
    assert owner_is_dead(owner) is False


def test_a_process_of_another_user_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pid that exists but belongs to another user (kill raises PermissionError) is alive."""

    def refuse(pid: int, signal: int) -> None:
        raise PermissionError(pid)

    monkeypatch.setattr(_model.os, "kill", refuse)
    assert owner_is_dead(f"{socket.gethostname()}:1:x") is False
