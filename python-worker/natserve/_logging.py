"""Logging setup: one stderr handler for natserve's own messages, and `get_logger()`.

Two formats, chosen by ``--log-format`` (``NATSERVE_LOG_FORMAT``, which the agent passes on
to every worker process): text lines, or one JSON object per line with the Rust binaries'
field names (``timestamp``, ``level``, ``target``, ``message``). Either way a record
logged while a worker runs a request carries that request's ``request_id`` and
``trace_id`` (comma-separated, in input order, for a batched ``forward``); see
`request_ids` and `trace_ids`.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Dict, List, Sequence, Tuple

_LOGGER_NAME = "natserve"
LOG_FORMATS = ("text", "json")


class _Running:
    """The ids of what this worker process runs now: the running batch's (request id,
    trace id) per item, and which of its items the code at work is on. One batch runs at
    a time, on the main thread, so a plain holder is enough; setting ``items`` is an
    attribute store, cheap enough for every item of every batch."""

    __slots__ = ("ids", "items")

    def __init__(self) -> None:
        self.ids: Sequence[Tuple[str, str]] = ()
        self.items: Sequence[int] = ()

    def request_ids(self) -> List[str]:
        ids = self.ids
        return [ids[i][0] for i in self.items] if ids else []

    def trace_ids(self) -> List[str]:
        ids = self.ids
        return [ids[i][1] for i in self.items] if ids else []


#: What `BatchRunner` runs now.
RUNNING = _Running()


def request_ids() -> List[str]:
    """The request ids of the items the running ``forward`` got, in input order (one
    without batching); empty outside a request (warm-up). Also ``Worker.request_ids``."""
    return RUNNING.request_ids()


def trace_ids() -> List[str]:
    """The trace ids (the trace-id field of each request's ``traceparent``) of the items
    the running ``forward`` got, ``""`` for one that came without; empty outside a
    request. Also ``Worker.trace_ids``."""
    return RUNNING.trace_ids()


def _ids_of(record: logging.LogRecord) -> Tuple[str, str]:
    return ",".join(RUNNING.request_ids()), ",".join(t for t in RUNNING.trace_ids() if t)


class _TextFormatter(logging.Formatter):
    """The text line, with ``request_id=... trace_id=...`` at the end when a request runs."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request, trace = _ids_of(record)
        if request:
            line += f" request_id={request}"
        if trace:
            line += f" trace_id={trace}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes in ``exception``)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self._prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        out: Dict[str, Any] = {
            "timestamp": stamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        if self._prefix:
            out["worker"] = self._prefix
        request, trace = _ids_of(record)
        if request:
            out["request_id"] = request
        if trace:
            out["trace_id"] = trace
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"), default=str)


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


def _formatter(prefix: str, log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(prefix)
    fmt = f"%(asctime)s %(levelname)s {prefix + ' ' if prefix else ''}%(name)s: %(message)s"
    return _TextFormatter(fmt)


def configure(level: str, *, prefix: str = "", log_format: str = "text") -> None:
    """Sends natserve's records to stderr at ``level`` (debug, info, warning, error), as
    ``log_format`` (text or json) says.

    Idempotent: a second call only changes the level, prefix and format. ``prefix``
    tells the processes apart in a shared terminal, e.g. ``[/inference:0 #1]``. With json,
    the root logger (a user's own ``logging.getLogger(__name__)``) writes JSON too, unless
    the program gave it a handler of its own.
    """
    logger = get_logger()
    logger.setLevel(level.upper())
    logger.propagate = False
    formatter = _formatter(prefix, log_format)
    _install(logger, formatter)
    root = logging.getLogger()
    if log_format == "json" and all(isinstance(h, _StderrHandler) for h in root.handlers):
        _install(root, formatter)


def _install(logger: logging.Logger, formatter: logging.Formatter) -> None:
    for existing in logger.handlers:
        if isinstance(existing, _StderrHandler):
            existing.setFormatter(formatter)
            return
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    logger.addHandler(handler)
