"""Logging setup: one stderr handler for natserve's own messages, and `get_logger()`."""

from __future__ import annotations

import logging
import sys
from typing import Any

_LOGGER_NAME = "natserve"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be
    replaced after logging is configured, by tests or by the user's program)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def get_logger() -> logging.Logger:
    """The logger user code shares with natserve (Mosec's ``get_logger``).

    Its records go to stderr; in a worker process the agent passes them on.
    """
    return logging.getLogger(_LOGGER_NAME)


def configure(level: str, *, prefix: str = "") -> None:
    """Sends natserve's records to stderr at ``level`` (debug, info, warning, error).

    Idempotent: a second call only changes the level and prefix. ``prefix`` tells the
    processes apart in a shared terminal, e.g. ``[/inference:0 #1]``.
    """
    logger = get_logger()
    logger.setLevel(level.upper())
    logger.propagate = False
    fmt = f"%(asctime)s %(levelname)s {prefix + ' ' if prefix else ''}%(name)s: %(message)s"
    for existing in logger.handlers:
        if isinstance(existing, _StderrHandler):
            existing.setFormatter(logging.Formatter(fmt))
            return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
