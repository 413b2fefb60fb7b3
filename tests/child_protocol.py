"""What the child-process scripts of the tests share (crash_worker.py, redis_worker.py,
redis_poison_worker.py): progress lines on stdout, which is the parent's protocol, and
structlog's records on stderr, out of its way. Imported as a sibling module, since the
scripts run as ``python tests/<script>.py``."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import structlog

_print_lock = threading.Lock()


def out(line: str) -> None:
    """One progress line for the parent, flushed at once (thread-safe)."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def log_to_stderr(*processors: Any) -> None:
    """Render structlog records at INFO and above as key=value lines on stderr, after
    *processors* (structlog's default would print to stdout, the parent's protocol)."""
    structlog.configure(
        processors=[
            *processors,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
