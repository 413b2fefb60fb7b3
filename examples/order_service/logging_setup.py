"""structlog configuration for the example's commands (the eventbus library never configures
structlog; applications do, as here).

* On a terminal: ``ConsoleRenderer`` with colours. Elsewhere: the same, without colours.
* With ``--json``: one JSON object per line, tracebacks as structured data.
* ``structlog.contextvars.merge_contextvars`` first, so a ``request_id`` bound by the web layer
  (or by the demo) lands in every line logged while it is bound, handler lines included.
* Console only: the ``handler.failed`` records of the library carry the traceback of each
  failed attempt; they are dropped unless ``tracebacks=True`` (the ``dead_lettered`` record
  that follows says what went wrong for good). JSON output keeps them all.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["configure_logging"]


def _add_local_time(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # Wall-clock time to the millisecond: retries 100 ms apart should look apart.
    event_dict["timestamp"] = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    return event_dict


def _drop_attempt_tracebacks(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    if event_dict.get("event") == "handler.failed":
        event_dict.pop("exc_info", None)
    return event_dict


def configure_logging(
    *,
    json: bool = False,
    level: str = "info",
    stream: TextIO | None = None,
    tracebacks: bool = False,
) -> None:
    """Configure structlog for the whole process: log lines at *level* and above go to
    *stream* (default ``sys.stderr``), as JSON or for humans."""
    stream = stream if stream is not None else sys.stderr
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if json:
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ]
    else:
        if not tracebacks:
            processors.append(_drop_attempt_tracebacks)
        processors += [
            _add_local_time,
            structlog.dev.ConsoleRenderer(colors=stream.isatty()),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # The HTTP server logs each request on its own: ours (``http.request``) is structured.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
