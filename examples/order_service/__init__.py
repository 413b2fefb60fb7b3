"""The order service: eventbus on something that looks like a small production service.

Modules, from the inside out:

* :mod:`.domain`: orders, typed domain events (``OrderCreated``, ``OrderShipped``), validation.
* :mod:`.repository`: orders and the audit trail in SQLite (stdlib ``sqlite3``), in the file
  that also holds the bus's event store.
* :mod:`.fakes`: the outside world, faked (mailer, inventory, warehouse, analytics).
* :mod:`.orders`: ``OrderService``, the use cases: validate, then save and emit in one
  transaction.
* :mod:`.handlers`: what happens after an order event, each handler on its own.
* :mod:`.wiring`: settings and the container that builds all of the above around one bus.
* :mod:`.web` (Flask app factory), :mod:`.server` (``serve``), :mod:`.demo` (``demo``),
  :mod:`.burst` (``burst``, ``check``), :mod:`.worker` (``worker``).

Run ``.venv/bin/python -m examples.order_service --help`` from the repository root.
"""
