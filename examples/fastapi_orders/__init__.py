"""The orders API on FastAPI: eventbus with ``async def`` handlers on the server's event loop.

Modules, from the inside out:

* :mod:`.orders`: orders, the ``order:created`` payload, an in-memory repository.
* :mod:`.fakes`: an async mailer, async analytics and a blocking inventory, faked.
* :mod:`.handlers`: two ``async def`` handlers and one plain one for ``order:created``.
* :mod:`.schemas`: the JSON in and out (pydantic).
* :mod:`.api`: the routes. :mod:`.app`: ``create_app()`` and the lifespan that binds the bus.
* :mod:`.logging_setup`, ``__main__``: structlog, and the server under uvicorn.

Run ``.venv/bin/python -m examples.fastapi_orders`` from the repository root; see README.md.
"""
