"""natserve: Mosec-style model serving where every hop goes through NATS JetStream.

Write `Worker` subclasses, add them to a `Server` with ``append_worker``, call
``run()``. `Client` submits requests over NATS without going through HTTP.
"""

from __future__ import annotations

from . import errors, mixin, utils
from ._client import Client
from ._logging import get_logger
from ._runtime import Runtime
from ._server import Server
from ._version import __version__
from ._worker_base import SSEWorker, Worker
from .errors import (
    ClientError,
    DecodingError,
    EncodingError,
    NatserveError,
    RequestTimeoutError,
    ServerError,
    UnavailableError,
    ValidationError,
)

__all__ = [
    "Client",
    "ClientError",
    "DecodingError",
    "EncodingError",
    "NatserveError",
    "RequestTimeoutError",
    "Runtime",
    "SSEWorker",
    "Server",
    "ServerError",
    "UnavailableError",
    "ValidationError",
    "Worker",
    "__version__",
    "errors",
    "get_logger",
    "mixin",
    "utils",
]
