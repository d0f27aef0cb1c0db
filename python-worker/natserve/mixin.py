"""Opt-in (de)serialization mixins, placed before `Worker` in the bases.

``PickleMixin`` pickles data between stages: only for deployments where every process
that can publish to NATS is trusted, since unpickling runs code. ``MsgpackMixin`` uses
msgpack at the HTTP edges instead of JSON.
"""

from __future__ import annotations

import pickle
from typing import Any

import msgpack  # type: ignore[import-untyped]  # ships no type hints

from .errors import DecodingError, EncodingError

__all__ = ["MsgpackMixin", "PickleMixin"]


class PickleMixin:
    """Pickle between stages (any Python object, but only between trusted processes)."""

    def serialize_ipc(self, data: Any) -> bytes:
        try:
            return pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            raise EncodingError(f"cannot pickle the result for the next stage: {err}") from err

    def deserialize_ipc(self, data: bytes) -> Any:
        return pickle.loads(data)  # noqa: S301 - explicit opt-in, see the module docstring


class MsgpackMixin:
    """msgpack request and response bodies; responses are ``application/msgpack``."""

    resp_mime_type = "application/msgpack"

    def serialize(self, data: Any) -> bytes:
        try:
            packed: bytes = msgpack.packb(data, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as err:
            raise EncodingError(f"cannot serialize the result with msgpack: {err}") from err
        return packed

    def deserialize(self, data: bytes) -> Any:
        if not data:
            raise DecodingError("empty request body, expected msgpack")
        try:
            return msgpack.unpackb(data, raw=False)
        except msgpack.StackError as err:  # its message is empty
            raise DecodingError("request body is nested too deeply to decode as msgpack") from err
        except (ValueError, TypeError, msgpack.UnpackException) as err:
            raise DecodingError(f"request body is not valid msgpack: {err}") from err
