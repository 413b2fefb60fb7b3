"""The RabbitMQ harness itself (tests/support/rabbitmq.py): the servers the RabbitMQ tests rely
on are real, local-only, isolated per test, unprivileged, leave nothing running, and keep
durable queues' persistent messages across a crash."""

from __future__ import annotations

import os
import pwd
import socket
import sys
import uuid
from pathlib import Path

import pika
import pika.exceptions
import pytest

from tests.support.rabbitmq import SYSTEM_USER, RabbitMQServer

pytestmark = pytest.mark.integration

PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)


def _name(kind: str) -> str:
    return f"test-{kind}-{uuid.uuid4().hex[:12]}"


def _connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def _get(url: str, queue: str) -> list[bytes]:
    """Every message of *queue*, taken off it."""
    bodies = []
    with _connect(url) as connection:
        channel = connection.channel()
        while True:
            _method, _properties, body = channel.basic_get(queue, auto_ack=True)
            if body is None:
                return bodies
            bodies.append(body)


def _queue_exists(url: str, queue: str) -> bool:
    """Whether *queue* exists (a passive declare: the broker closes the channel with 404 NOT
    FOUND otherwise)."""
    with _connect(url) as connection:
        try:
            connection.channel().queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code != 404:
                raise
            return False
    return True


def _refuses_connections(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return True
    return False


def _running(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie."""
    status = Path(f"/proc/{pid}/status")
    if status.parent.parent.is_dir():
        try:
            return "\nState:\tZ" not in status.read_text()
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _listen_addresses(port: int) -> set[str] | None:
    """The local addresses of the TCP sockets listening on *port*, from Linux's /proc/net;
    None elsewhere."""
    tables = {"tcp": socket.AF_INET, "tcp6": socket.AF_INET6}
    if not Path("/proc/net/tcp").exists():
        return None
    found = set()
    for table, family in tables.items():
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, _, port_hex = fields[1].rpartition(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if sys.byteorder == "little":  # each 32-bit word is shown in host byte order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def _outward_address() -> str | None:
    """This machine's address on its default route (a UDP socket's connect sends nothing),
    or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_connects_declares_publishes_and_gets(rabbitmq_url: str) -> None:
    queue = _name("queue")
    with _connect(rabbitmq_url) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, auto_delete=True)
        channel.basic_publish("", queue, b"hello")
        method, _properties, body = channel.basic_get(queue, auto_ack=True)
        channel.queue_delete(queue)
    assert method is not None
    assert body == b"hello"
    assert rabbitmq_url.startswith("amqp://guest:guest@127.0.0.1:")


def test_listens_on_loopback_only(rabbitmq_server: RabbitMQServer) -> None:
    ports = (rabbitmq_server.port, rabbitmq_server.dist_port)
    addresses = [_listen_addresses(port) for port in ports]
    outward = _outward_address()
    if addresses[0] is None and outward is None:
        pytest.skip("no /proc/net and no non-loopback address to check listeners with")
    if addresses[0] is not None:
        # AMQP and the Erlang distribution: 127.0.0.1 only (not 0.0.0.0, not IPv6).
        assert addresses == [{"127.0.0.1"}, {"127.0.0.1"}]
        # epmd adds the loopback of the other family of its own accord.
        epmd = _listen_addresses(rabbitmq_server.epmd_port) or set()
        assert "127.0.0.1" in epmd
        assert epmd <= {"127.0.0.1", "::1"}
    if outward is not None:
        assert all(
            _refuses_connections(port, outward) for port in (*ports, rabbitmq_server.epmd_port)
        )


def test_runs_as_an_unprivileged_user(rabbitmq_server: RabbitMQServer) -> None:
    if os.geteuid() == 0:
        try:
            expected = pwd.getpwnam(SYSTEM_USER).pw_uid
        except KeyError:
            pytest.skip(f"no {SYSTEM_USER!r} user: the server runs as root")
    else:
        expected = os.geteuid()
    assert expected != 0
    assert (rabbitmq_server.directory / "mnesia").stat().st_uid == expected
    assert (rabbitmq_server.directory / ".erlang.cookie").stat().st_uid == expected
    if Path("/proc").is_dir():  # Linux: the real, effective and saved uids
        for pid in (rabbitmq_server.pid, rabbitmq_server.epmd_pid):
            assert pid is not None
            status = Path(f"/proc/{pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert {int(uid) for uid in uids.split()[1:]} == {expected}


def test_a_killed_server_restarts_with_its_durable_queue_and_persistent_message(
    own_rabbitmq: RabbitMQServer,
) -> None:
    durable, transient = _name("durable"), _name("transient")
    with _connect(own_rabbitmq.url) as connection:
        channel = connection.channel()
        channel.confirm_delivery()  # each publish returns once the broker has the message
        channel.queue_declare(durable, durable=True)
        channel.queue_declare(transient)
        channel.basic_publish("", durable, b"kept", PERSISTENT)
        channel.basic_publish("", durable, b"not persistent")
    port, first_pid = own_rabbitmq.port, own_rabbitmq.pid
    processes = own_rabbitmq.processes()

    own_rabbitmq.kill()

    assert not own_rabbitmq.running
    assert own_rabbitmq.pid is None
    assert own_rabbitmq.processes() == []
    assert not [pid for pid in processes if _running(pid)]
    assert _refuses_connections(port)

    own_rabbitmq.start()

    assert own_rabbitmq.port == port
    assert own_rabbitmq.pid not in (None, first_pid)
    assert _get(own_rabbitmq.url, durable) == [b"kept"]
    assert not _queue_exists(own_rabbitmq.url, transient)
    own_rabbitmq.kill()
    own_rabbitmq.kill()  # a no-op once more: idempotent


def test_stops_cleanly_leaving_nothing_running_and_restarts() -> None:
    with RabbitMQServer() as server:
        queue = _name("durable")
        with _connect(server.url) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare(queue, durable=True)
            channel.basic_publish("", queue, b"kept", PERSISTENT)
        node, epmd = server.pid, server.epmd_pid
        processes = server.processes()
        assert node in processes
        assert epmd in processes

        server.stop()

        assert not [pid for pid in processes if _running(pid)]
        assert server.processes() == []
        assert (server.pid, server.epmd_pid) == (None, None)
        assert all(
            _refuses_connections(port) for port in (server.port, server.dist_port, server.epmd_port)
        )
        server.stop()  # idempotent
        server.start()
        assert server.pid not in (None, node)
        assert _get(server.url, queue) == [b"kept"]
        directory, processes = server.directory, server.processes()
    assert not server.running
    assert not directory.exists()
    assert not [pid for pid in processes if _running(pid)]


def test_two_servers_run_side_by_side(
    rabbitmq_server: RabbitMQServer, own_rabbitmq: RabbitMQServer
) -> None:
    def identity(server: RabbitMQServer) -> set[object]:
        return {
            server.port,
            server.dist_port,
            server.epmd_port,
            server.nodename,
            server.directory,
            server.pid,
            server.epmd_pid,
        }

    assert not identity(rabbitmq_server) & identity(own_rabbitmq)
    queue = _name("own")
    with _connect(own_rabbitmq.url) as connection:
        channel = connection.channel()
        channel.queue_declare(queue)
        channel.basic_publish("", queue, b"only here")
    assert not _queue_exists(rabbitmq_server.url, queue)
    assert _get(own_rabbitmq.url, queue) == [b"only here"]
