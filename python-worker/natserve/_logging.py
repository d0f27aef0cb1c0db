"""Logging setup: one stderr handler for natserve's own messages, and `get_logger()`."""

from __future__ import annotations

import logging
import sys

_LOGGER_NAME = "natserve"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    for handler in logger.handlers:
        if getattr(handler, "_natserve", False):
            handler.setFormatter(logging.Formatter(fmt))
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    handler._natserve = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
