"""The order service: eventbus on something that looks like a small production service.

Modules, from the inside out:

* :mod:`.domain`: orders, typed domain events (``OrderCreated``, ``OrderShipped``), validation.
* :mod:`.repository`: orders and the audit trail in SQLite (stdlib ``sqlite3``).
* :mod:`.services`: fakes of the outside world (mailer, inventory, warehouse, analytics).
* :mod:`.service`: ``OrderService``, the use cases: save, then emit.
* :mod:`.handlers`: what happens after an order event, each handler on its own.
* :mod:`.wiring`: settings and the container that builds all of the above around one bus.
* :mod:`.web` (Flask app factory), :mod:`.server` (``serve``), :mod:`.demo` (``demo``).

Run ``python -m examples.order_service --help`` from the repository root.
"""
