"""Benchmarks: eventbus against its peers, in one process and one run.

Run ``python -m bench`` from the repository root (``make bench``); ``--quick`` is a smoke run,
``--json PATH`` writes machine-readable results, ``--chart PATH`` a PNG (needs matplotlib).
``python -m bench.profiling`` profiles eventbus's thread dispatch. See ``docs/benchmarks.md``.

Every dispatcher gets the same handlers (see :mod:`bench._harness`), and structlog is configured
the way a production application would: records below WARNING are filtered out, the rest are
rendered as JSON lines (to ``os.devnull`` here).
"""
