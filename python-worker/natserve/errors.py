"""Exceptions a `Worker` raises to choose a request's outcome, and those `Client` raises.

The hierarchy follows Mosec's ``mosec.errors`` so a Mosec program only changes its
import lines. What the worker loop answers for each (see docs/protocol.md):

=================  ==================  ===============================
raised             item status         reply body prefix
=================  ==================  ===============================
ValidationError    validation_error    ``validation error: <message>``
DecodingError      client_error        ``decoding error: <message>``
ClientError        client_error        ``client error: <message>``
EncodingError      server_error        ``encoding error: <message>``
ServerError        server_error        ``server error: <message>``
anything else      server_error        ``internal error: <Type>: <message>``
=================  ==================  ===============================
"""

from __future__ import annotations

__all__ = [
    "ClientError",
    "DecodingError",
    "EncodingError",
    "MosecError",
    "MosecTimeoutError",
    "NatserveError",
    "RequestTimeoutError",
    "ServerError",
    "UnavailableError",
    "ValidationError",
]


class NatserveError(Exception):
    """Base of every natserve error (Mosec's ``MosecError``)."""

    code: int = 500
    msg: str = "natserve error"


#: Mosec's name for the base class, kept so ``except MosecError`` keeps working.
MosecError = NatserveError


class ClientError(NatserveError):
    """The request cannot be served as sent (HTTP 400)."""

    code = 400
    msg = "bad request"


class ServerError(NatserveError):
    """The server failed while serving a valid request (HTTP 500)."""

    code = 500
    msg = "internal error"


class EncodingError(ServerError):
    """A result could not be serialized (HTTP 500)."""

    msg = "encoding error"


class DecodingError(ClientError):
    """The request body could not be deserialized (HTTP 400)."""

    msg = "decoding error"


class ValidationError(NatserveError):
    """The request decoded but its content is not acceptable (HTTP 422)."""

    code = 422
    msg = "validation error"


class UnavailableError(NatserveError):
    """Raised by `Client`: no worker can take the request now (overloaded or not served)."""

    code = 503
    msg = "unavailable"


class RequestTimeoutError(NatserveError, TimeoutError):
    """Raised by `Client`: the request's deadline passed (also a builtin ``TimeoutError``)."""

    code = 504
    msg = "timeout"


class MosecTimeoutError(BaseException):
    """Mosec's forward-timeout exception, kept so ``except MosecTimeoutError`` still runs.

    A `BaseException`, as in Mosec, so ``except Exception`` does not swallow it. natserve
    never raises it inside a worker: a batch past ``append_worker(timeout=...)`` is
    abandoned by the agent, which replaces the worker process and answers its items 504.
    """

    code = 504
    msg = "timeout error"
