"""tests/support/net.py: the ports servers started by the tests listen on."""

from __future__ import annotations

import socket

from tests.support.net import _ephemeral_from, server_port


def test_server_port_is_free_and_below_the_ephemeral_range() -> None:
    """A restarted server's port is never a reconnecting client's source port (a client
    connecting to a local port it was itself given holds that port, and the server's
    restart fails with "address in use"): it lies below the kernel's ephemeral ports."""
    ports = {server_port() for _ in range(20)}
    assert all(1024 <= port < _ephemeral_from() for port in ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # free: nothing listens on it
