"""What the tests share beyond fixtures (those are in tests/conftest.py).

* The one way a test starts each real server, on free local ports in a temporary directory
  (skipped when it is not installed, failed under CI): :mod:`tests.support.redis`
  (:class:`~tests.support.redis.RedisServer`), :mod:`tests.support.postgres`
  (:class:`~tests.support.postgres.PostgresServer`) and :mod:`tests.support.rabbitmq`
  (:class:`~tests.support.rabbitmq.RabbitMQServer`).
  :mod:`tests.support.server` is what they share: waiting for a server to answer and stopping
  it, the base class :class:`~tests.support.server.ServerProcess`, running a server as an
  unprivileged user when the tests run as root, and following the processes it starts; the
  benchmarks use it too.
* :mod:`tests.support.children`: the one line protocol between a test and the child processes
  it starts: :func:`~tests.support.children.out` on the child's side,
  :class:`~tests.support.children.ChildProcess` (read by lines, every wait bounded) on the
  test's side.
* :mod:`tests.support.net`: free ports, waiting for a child server to listen, HTTP calls;
  :mod:`tests.support.http`: polling a child server's JSON over HTTP with httpx.
* :mod:`tests.support.executors`: an executor that holds jobs until the test runs them;
  :mod:`tests.support.damaged_rows`: stored events with one field damaged;
  :mod:`tests.support.waiting`: a recording handler that signals once enough arrived, and a
  bounded poll; :mod:`tests.support.browser`: headless Chromium for the dashboard;
  :mod:`tests.support.dashboard`: the dashboard's pages through Flask's test client.
* ``crash_worker``, ``ordered_worker``, ``postgres_worker``, ``rabbitmq_worker``,
  ``rate_consumer``, ``redis_worker``, ``redis_poison_worker``: the scripts tests run as child
  processes (``python -m tests.support.<script>``, see :func:`~tests.support.children.script`).

Nothing here imports pytest at import time except :mod:`tests.support.redis`,
:mod:`tests.support.postgres`, :mod:`tests.support.rabbitmq`,
:mod:`tests.support.damaged_rows`, :mod:`tests.support.waiting` and
:mod:`tests.support.browser`, so the worker scripts stay quick to start.
"""
