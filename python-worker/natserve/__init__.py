"""natserve: Mosec-style model serving where every hop goes through NATS JetStream.

Write `Worker` subclasses, add them to a `Server` with ``append_worker``, call
``run()``. `Client` submits requests over NATS without going through HTTP.
"""

from __future__ import annotations

from . import errors
from ._client import Client
from ._logging import get_logger
from ._server import Server
from ._worker_base import Worker
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

__version__ = "0.1.0"

__all__ = [
    "Client",
    "ClientError",
    "DecodingError",
    "EncodingError",
    "NatserveError",
    "RequestTimeoutError",
    "Server",
    "ServerError",
    "UnavailableError",
    "ValidationError",
    "Worker",
    "__version__",
    "errors",
    "get_logger",
]
