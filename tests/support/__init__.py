"""What the tests share beyond fixtures (those are in tests/conftest.py).

* :mod:`tests.support.redis`: :class:`~tests.support.redis.RedisServer`, the one way a test
  starts a real ``redis-server`` (skipped without one, failed under CI).
* :mod:`tests.support.children`: the one line protocol between a test and the child processes
  it starts: :func:`~tests.support.children.out` on the child's side,
  :class:`~tests.support.children.ChildProcess` (read by lines, every wait bounded) on the
  test's side.
* :mod:`tests.support.net`: free ports, waiting for a child server to listen, HTTP calls.
* ``crash_worker``, ``redis_worker``, ``redis_poison_worker``: the scripts tests run as child
  processes (``python -m tests.support.<script>``, see :func:`~tests.support.children.script`).

Nothing here imports pytest at import time except :mod:`tests.support.redis`, so the worker
scripts stay quick to start.
"""
