"""structlog set-up: JSON lines for production, readable console output for people."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

from proxy.secrets import redact_log_event

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

#: The processors of the per-request line (`request_logger`), set by `configure_logging`.
_request_processors: list[structlog.typing.Processor] | None = None


class _Timestamper:
    """ISO-8601 UTC timestamps, formatting the date and time only once per second."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method: str,
                 event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Configure structlog once per process; `fmt` is "json" or "console"."""
    global _request_processors
    shared: list[structlog.typing.Processor] = [
        redact_log_event,
        structlog.processors.add_log_level,
        _Timestamper(),
    ]
    # A traceback becomes text before the secrets are scrubbed, so that its text is
    # scrubbed too (an exception's message may quote a key). The request line never
    # carries one: its processors go without.
    formatted: list[structlog.typing.Processor] = [structlog.processors.format_exc_info,
                                                   *shared]
    if fmt == "console":
        renderer: structlog.typing.Processor = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty())
        _request_processors = [*shared, renderer]
        structlog.configure(
            processors=[*formatted, renderer],
            wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=True,
        )
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        _request_processors = [*shared, renderer]
        structlog.configure(
            processors=[*formatted, renderer],
            wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
            logger_factory=structlog.BytesLoggerFactory(file=sys.stderr.buffer),
            cache_logger_on_first_use=True,
        )


def request_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """The logger of the line every request writes, as configured now: already bound (a
    logger from `structlog.get_logger` is a proxy that finds its bound logger again on
    every call), and without the exception formatter (the line never carries one)."""
    logger: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
        None, processors=_request_processors, logger_factory_args=(name,)).bind()
    return logger
