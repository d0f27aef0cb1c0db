"""The `Worker` base class users subclass: `forward` plus the (de)serialization edges.

A worker process builds its worker with ``cls.__new__`` and sets ``worker_id``,
``stage`` and ``max_batch_size`` before calling ``__init__``, so a user's ``__init__``
can already use them (to pick a GPU, for example). Defaults:

- first stage: ``deserialize`` turns the raw request body into ``forward``'s input (JSON);
- last stage: ``serialize`` turns ``forward``'s output into the response body (JSON);
- between stages: ``serialize_ipc`` / ``deserialize_ipc`` use msgpack. Pickle is never
  used unless a worker opts in with `natserve.mixin.PickleMixin`.
"""

from __future__ import annotations

import abc
import json
import sys
from typing import Any, List, Optional

import msgpack  # type: ignore[import-untyped]  # ships no type hints

from .errors import DecodingError, EncodingError, ServerError


class Worker(abc.ABC):
    """One stage of a pipeline. Subclass it and implement `forward`.

    With ``max_batch_size == 1`` `forward` gets one item and returns one result; with
    a larger ``max_batch_size`` it gets a list of items and must return a list of the
    same length, result ``i`` for item ``i``.

    Raise a `natserve.errors` exception to choose an item's outcome (`ValidationError`
    for 422, `ClientError` for 400, `ServerError` for 500). One bad item never fails its
    batch-mates: when a batching ``forward`` raises, natserve re-runs the batch split in
    halves until the failing items are alone, so ``forward`` may see an item twice.

    Class attributes:
        example: one item of `forward`'s input, used to warm the worker up before it
            takes traffic. A batching stage gets it as a list of ``max_batch_size``
            copies, so the largest batch shape is exercised.
        multi_examples: a list of such items, each used in turn, when ``example`` is None.
        resp_mime_type: the ``Content-Type`` of the last stage's responses.
    """

    example: Any = None
    multi_examples: Optional[List[Any]] = None
    resp_mime_type: str = "application/json"

    _worker_id: int = 0
    _stage: int = 0
    _max_batch_size: int = 1

    def __init__(self) -> None:  # noqa: B027 - deliberately empty, not abstract
        """Does nothing: ``worker_id``, ``stage`` and ``max_batch_size`` are set before
        ``__init__`` runs and must survive a user's ``super().__init__()``."""

    @property
    def worker_id(self) -> int:
        """1-based index of this process among the stage's processes on its agent."""
        return self._worker_id

    @worker_id.setter
    def worker_id(self, worker_id: int) -> None:
        self._worker_id = worker_id

    @property
    def stage(self) -> int:
        """0-based index of this worker's stage in its route's pipeline."""
        return self._stage

    @stage.setter
    def stage(self, stage: int) -> None:
        self._stage = stage

    @property
    def max_batch_size(self) -> int:
        """The stage's ``max_batch_size``; above 1, `forward` gets and returns lists."""
        return self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, max_batch_size: int) -> None:
        self._max_batch_size = max_batch_size

    def serialize(self, data: Any) -> bytes:
        """Last stage: one `forward` result to the response body. JSON by default.

        Raises:
            EncodingError: the result is not JSON-serializable.
        """
        try:
            return json.dumps(data).encode()
        except (TypeError, ValueError) as err:
            raise EncodingError(f"cannot serialize the result as JSON: {err}") from err
        except RecursionError as err:
            raise EncodingError("cannot serialize the result as JSON: nested too deeply") from err

    def deserialize(self, data: bytes) -> Any:
        """First stage: the raw request body to one `forward` input. JSON by default.

        Raises:
            DecodingError: the body is empty, not JSON, or nested deeper than the
                interpreter's recursion limit lets the decoder go.
        """
        if not data:
            raise DecodingError("empty request body, expected JSON")
        try:
            return json.loads(data)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            raise DecodingError(f"request body is not valid JSON: {err}") from err
        except RecursionError as err:
            # A nesting bomb is the client's fault; the decoder's own depth check (the
            # recursion limit) costs nothing on ordinary bodies, a pre-scan would.
            raise DecodingError(
                "request body is nested too deeply to decode as JSON "
                f"(deeper than about {sys.getrecursionlimit()} levels)"
            ) from err

    def serialize_ipc(self, data: Any) -> bytes:
        """Between stages: one `forward` result to bytes for the next stage. msgpack."""
        try:
            packed: bytes = msgpack.packb(data, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as err:
            raise EncodingError(
                f"cannot serialize the result for the next stage with msgpack: {err}; "
                "override serialize_ipc/deserialize_ipc or use natserve.mixin.PickleMixin"
            ) from err
        return packed

    def deserialize_ipc(self, data: bytes) -> Any:
        """Between stages: the previous stage's bytes to one `forward` input. msgpack."""
        try:
            return msgpack.unpackb(data, raw=False)
        except msgpack.StackError as err:
            raise ServerError(
                "cannot decode the previous stage's output with msgpack: nested too deeply"
            ) from err
        except (ValueError, TypeError, msgpack.UnpackException) as err:
            raise ServerError(
                f"cannot decode the previous stage's output with msgpack: {err}"
            ) from err

    @abc.abstractmethod
    def forward(self, data: Any) -> Any:
        """The model: one input to one output, or (batching) a list to a list."""
        raise NotImplementedError
