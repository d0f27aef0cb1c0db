"""Opt-in (de)serialization mixins, Mosec's ``mosec.mixin``, placed before `Worker` in
the bases (``class Model(MsgpackMixin, Worker)``).

- `MsgpackMixin`: msgpack request and response bodies.
- `TypedMsgPackMixin`: msgpack bodies decoded into the ``msgspec.Struct`` that
  `forward` is annotated with; a body that does not fit is a `ValidationError` (422)
  naming the field. Needs ``msgspec`` (``pip install 'natserve[msgspec]'``).
- `NumBinIPCMixin`: between stages, arrays encoded with ``numbin`` inside natserve's
  msgpack, so an array may sit anywhere in the result. Needs ``numbin``.
- `RedisShmIPCMixin`: between stages, the data goes into Redis and only its key through
  NATS. Needs ``redis``.
- `PlasmaShmIPCMixin`: kept so imports work; plasma was removed from pyarrow, so using it
  raises.
- `PickleMixin`: pickle between stages, only where every process that can publish to NATS
  is trusted, since unpickling runs code.

Optional libraries are imported when first used, so importing this module never needs them.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Dict, NoReturn, Optional, Tuple

import msgpack  # type: ignore[import-untyped]  # ships no type hints

from . import _ipc
from ._worker_base import Worker
from .errors import DecodingError, EncodingError, ServerError, ValidationError
from .utils import ParseTarget, get_forward_input_type, parse_func_type

__all__ = [
    "MsgpackMixin",
    "NumBinIPCMixin",
    "PickleMixin",
    "PlasmaShmIPCMixin",
    "RedisShmIPCMixin",
    "TypedMsgPackMixin",
]


def _need(module: str, extra: str, mixin: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise ImportError(
            f"{mixin} needs the {extra!r} package: pip install 'natserve[{extra}]'"
        ) from err


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

    req_mime_type = "application/msgpack"
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


class TypedMsgPackMixin(Worker):
    """msgpack bodies validated into `forward`'s annotated type with ``msgspec``.

    Annotate `forward`'s input (``List[T]`` for a batching stage) with a
    ``msgspec.Struct``; a body that is not valid msgpack is a `DecodingError` (400), one
    that does not fit the type a `ValidationError` (422) whose message names the field,
    as msgspec words it (``Object missing required field `binary```). Results are
    encoded with ``msgspec.msgpack``.
    """

    req_mime_type = "application/msgpack"
    resp_mime_type = "application/msgpack"
    _input_typ: Optional[Any] = None

    def deserialize(self, data: bytes) -> Any:
        msgspec = _need("msgspec", "msgspec", "TypedMsgPackMixin")
        if self._input_typ is None:
            self._input_typ = get_forward_input_type(self.forward, batched=self.max_batch_size > 1)
        if not data:
            raise DecodingError("empty request body, expected msgpack")
        try:
            return msgspec.msgpack.decode(data, type=self._input_typ)
        except msgspec.ValidationError as err:
            raise ValidationError(str(err)) from err
        except msgspec.DecodeError as err:
            raise DecodingError(f"request body is not valid msgpack: {err}") from err

    def serialize(self, data: Any) -> bytes:
        msgspec = _need("msgspec", "msgspec", "TypedMsgPackMixin")
        try:
            encoded: bytes = msgspec.msgpack.encode(data)
        except (TypeError, ValueError, OverflowError) as err:
            raise EncodingError(f"cannot serialize the result with msgpack: {err}") from err
        return encoded

    @classmethod
    def get_forward_json_schema(
        cls, target: ParseTarget, ref_template: str
    ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """The JSON schema of `forward`'s input or return type, as Mosec 0.9 has it."""
        msgspec = _need("msgspec", "msgspec", "TypedMsgPackMixin")
        typ = parse_func_type(cls.forward, target)
        try:
            (schema,), components = msgspec.json.schema_components([typ], ref_template=ref_template)
        except TypeError:
            return {}, {}
        return dict(schema), dict(components)


class NumBinIPCMixin:
    """Between stages: natserve's msgpack with each ``numpy.ndarray`` encoded by numbin."""

    def serialize_ipc(self, data: Any) -> bytes:
        _need("numbin", "numbin", "NumBinIPCMixin")
        return _ipc.pack(data, _ipc.numbin_ext)

    def deserialize_ipc(self, data: bytes) -> Any:
        return _ipc.unpack(data)


#: Where `RedisShmIPCMixin.set_redis_url` leaves the URL: the environment, so that the
#: worker processes the agent starts (children of the launcher) inherit it.
REDIS_URL_ENV = "NATSERVE_REDIS_URL"
_REDIS_KEY = "REDIS_SHM_IPC_KEY"


class RedisShmIPCMixin(Worker):
    """Between stages, data goes into Redis and only its key travels through NATS.

    As in Mosec: call ``RedisShmIPCMixin.set_redis_url("redis://host:6379/0")`` before
    ``Server.run()``, at the top of the program or in its main block (every host's
    launcher runs it, and its worker processes inherit it). The value itself is encoded
    with the worker's other bases (natserve's msgpack by default); the receiving stage
    reads and deletes it. Every agent of the route must reach that Redis.
    """

    _redis_client: Any = None
    _redis_key = _REDIS_KEY
    _next_id: Optional[bytes] = None

    @classmethod
    def set_redis_url(cls, url: str) -> None:
        """Sets the Redis URL for this process and the worker processes it starts."""
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(
                f"set_redis_url: url must be a Redis URL like 'redis://localhost:6379/0', "
                f"got {url!r}"
            )
        os.environ[REDIS_URL_ENV] = url

    def _get_client(self) -> Any:
        if self._redis_client is None:
            redis = _need("redis", "redis", "RedisShmIPCMixin")
            url = os.environ.get(REDIS_URL_ENV)
            if not url:
                raise ServerError(
                    "RedisShmIPCMixin has no Redis URL: call "
                    "RedisShmIPCMixin.set_redis_url('redis://host:6379/0') before Server.run()"
                )
            self._redis_client = redis.from_url(url)
        return self._redis_client

    def serialize_ipc(self, data: Any) -> bytes:
        client = self._get_client()
        if self._next_id is None:
            self._next_id = str(client.incr(self._redis_key)).encode()
        current = self._next_id
        with client.pipeline() as pipe:
            pipe.set(current, super().serialize_ipc(data))
            pipe.incr(self._redis_key)
            self._next_id = str(pipe.execute()[-1]).encode()
        return current

    def deserialize_ipc(self, data: bytes) -> Any:
        client = self._get_client()
        key = bytes(data)
        with client.pipeline() as pipe:
            pipe.get(key)
            pipe.delete(key)
            value = pipe.execute()[0]
        if value is None:
            raise ServerError(
                f"RedisShmIPCMixin: no value under key {key[:64]!r} in Redis (already "
                "read by an earlier delivery, or expired)"
            )
        return super().deserialize_ipc(value)


_PLASMA_WHY = (
    "not supported: plasma was removed from pyarrow (in 12.0); use RedisShmIPCMixin instead"
)


def _no_plasma(what: str) -> NoReturn:
    raise NotImplementedError(f"PlasmaShmIPCMixin.{what}: {_PLASMA_WHY}")


class PlasmaShmIPCMixin(Worker):
    """Mosec's plasma shared-memory IPC. Not supported: plasma was removed from pyarrow.

    Defining a subclass works (a module may hold both a plasma and a Redis variant, as
    Mosec's tests do); `Server.append_worker` refuses it, and every method raises.
    """

    _natserve_unsupported = f"is a PlasmaShmIPCMixin: {_PLASMA_WHY}"

    @classmethod
    def set_plasma_path(cls, path: str) -> None:
        _no_plasma(f"set_plasma_path({path!r})")

    def serialize_ipc(self, data: Any) -> bytes:
        _no_plasma("serialize_ipc")

    def deserialize_ipc(self, data: bytes) -> Any:
        _no_plasma("deserialize_ipc")
