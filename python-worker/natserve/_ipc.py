"""msgpack between stages, able to carry ``numpy.ndarray`` without pickle.

Mosec pickles between stages, so Mosec programs routinely hand arrays from one stage to
the next. natserve never unpickles what came over NATS, so an array travels as a msgpack
extension instead: ``EXT_ARRAY`` holds ``[dtype.str, shape, raw bytes]`` (numpy itself,
no other dependency), ``EXT_NUMBIN`` holds a ``numbin`` encoding
(`natserve.mixin.NumBinIPCMixin`). Object arrays are refused: their items could be
anything. numpy scalars become Python numbers. numpy is imported only when an array is
met, so programs without it never load it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import msgpack  # type: ignore[import-untyped]  # ships no type hints

from .errors import EncodingError, ServerError

EXT_ARRAY = 1
EXT_NUMBIN = 2

#: Turns one array into an ExtType; `pack` uses `_array_ext` unless told otherwise.
ArrayEncoder = Callable[[Any], Any]


def _numpy() -> Optional[Any]:
    return sys.modules.get("numpy")


def _array_ext(array: Any) -> Any:
    if array.dtype.hasobject:
        raise TypeError(f"cannot send a numpy array of dtype {array.dtype} (object items)")
    contiguous = array if array.flags.c_contiguous else array.copy(order="C")
    body = msgpack.packb(
        [array.dtype.str, list(array.shape), contiguous.tobytes()], use_bin_type=True
    )
    return msgpack.ExtType(EXT_ARRAY, body)


def numbin_ext(array: Any) -> Any:
    import numbin  # type: ignore[import-untyped,import-not-found,unused-ignore]

    return msgpack.ExtType(EXT_NUMBIN, numbin.dumps(array))


def _default(encode_array: ArrayEncoder) -> Callable[[Any], Any]:
    def default(obj: Any) -> Any:
        np = _numpy()
        if np is not None:
            if isinstance(obj, np.ndarray):
                return encode_array(obj)
            if isinstance(obj, np.generic) and not obj.dtype.hasobject:
                return obj.item()
        raise TypeError(f"can not serialize {type(obj).__name__!r} object")

    return default


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_ARRAY:
        import numpy as np  # type: ignore[import-not-found,unused-ignore]

        dtype, shape, raw = msgpack.unpackb(data, raw=False)
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
    if code == EXT_NUMBIN:
        import numbin

        return numbin.loads(data)
    return msgpack.ExtType(code, data)


def pack(data: Any, encode_array: ArrayEncoder = _array_ext) -> bytes:
    """One result to bytes for the next stage; `EncodingError` says what cannot go."""
    try:
        packed: bytes = msgpack.packb(data, use_bin_type=True, default=_default(encode_array))
    except (TypeError, ValueError, OverflowError, ImportError) as err:
        raise EncodingError(
            f"cannot serialize the result for the next stage with msgpack: {err}; "
            "override serialize_ipc/deserialize_ipc or use natserve.mixin.PickleMixin"
        ) from err
    return packed


def unpack(data: bytes) -> Any:
    """The previous stage's bytes to one input; `ServerError` when they do not decode."""
    try:
        return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook)
    except msgpack.StackError as err:
        raise ServerError(
            "cannot decode the previous stage's output with msgpack: nested too deeply"
        ) from err
    except ImportError as err:
        raise ServerError(
            f"cannot decode the previous stage's output: it holds an array and {err}"
        ) from err
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise ServerError(f"cannot decode the previous stage's output with msgpack: {err}") from err
