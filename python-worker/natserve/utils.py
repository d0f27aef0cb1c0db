"""Mosec's ``mosec.utils`` helpers for reading `forward`'s type annotations.

`ParseTarget` and `parse_func_type` are the names Mosec 0.9's
``Worker.get_forward_json_schema`` takes; `get_forward_input_type` and
`get_forward_return_type` are the later spelling. `natserve.mixin.TypedMsgPackMixin`
decodes each request into the type they find.
"""

from __future__ import annotations

import enum
import inspect
import typing
from typing import Any, Callable, Dict

__all__ = [
    "ParseTarget",
    "get_forward_input_type",
    "get_forward_return_type",
    "parse_func_type",
]


class ParseTarget(enum.Enum):
    """Which side of `forward` to read: its input or its return value."""

    INPUT = "INPUT"
    RETURN = "RETURN"


def _annotations(func: Callable[..., Any]) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(inspect.unwrap(func))
    except Exception:  # noqa: BLE001 - unresolvable names: fall back to the raw ones
        return dict(getattr(func, "__annotations__", {}))


def _unwrap_batch(func: Callable[..., Any], typ: Any, batched: bool, side: str) -> Any:
    if not batched or typing.get_origin(typ) not in (list, typing.List):
        return typ
    args = typing.get_args(typ)
    if len(args) != 1:
        raise TypeError(
            f"{getattr(func, '__qualname__', func)!s}: a batching forward must annotate its "
            f"{side} as List[T], got {typ!r}"
        )
    return args[0]


def get_forward_input_type(func: Callable[..., Any], *, batched: bool = False) -> Any:
    """The type of one request `forward` takes (``T`` of ``List[T]`` when ``batched``)."""
    hints = _annotations(func)
    typ = next((v for k, v in hints.items() if k != "return"), Any)
    return _unwrap_batch(func, typ, batched, "input")


def get_forward_return_type(func: Callable[..., Any], *, batched: bool = False) -> Any:
    """The type of one result `forward` returns (``T`` of ``List[T]`` when ``batched``)."""
    typ = _annotations(func).get("return", Any)
    return _unwrap_batch(func, typ, batched, "return value")


def parse_func_type(func: Callable[..., Any], target: ParseTarget) -> Any:
    """Mosec 0.9's spelling: the annotated input or return type of ``func``, a list
    annotation unwrapped to its item type."""
    if target is ParseTarget.INPUT:
        return get_forward_input_type(func, batched=True)
    return get_forward_return_type(func, batched=True)
