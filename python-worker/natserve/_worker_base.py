"""The `Worker` base class users subclass: `forward` plus the (de)serialization edges.

A worker process builds its worker with ``cls.__new__`` and sets ``worker_id``,
``stage`` and ``max_batch_size`` before calling ``__init__``, so a user's ``__init__``
can already use them (to pick a GPU, for example). Defaults:

- first stage: ``deserialize`` turns the raw request body into ``forward``'s input (JSON);
- last stage: ``serialize`` turns ``forward``'s output into the response body (JSON);
- between stages: ``serialize_ipc`` / ``deserialize_ipc`` use msgpack (a
  ``numpy.ndarray`` travels as a msgpack extension, see `natserve._ipc`). Pickle is never
  used unless a worker opts in with `natserve.mixin.PickleMixin`.

`SSEWorker` is Mosec's streaming worker: the last stage of a route, whose ``forward``
sends events with ``send_stream_event``; the ingress answers its route as Server-Sent
Events. ``is_cancelled`` (natserve's own; Mosec has none) tells any worker that the
requester of one of its items went away.
"""

from __future__ import annotations

import abc
import json
import sys
from typing import Any, Dict, List, Optional, Tuple

from . import _ipc, _logging
from ._running import ForwardCall
from .errors import DecodingError, EncodingError
from .utils import ParseTarget


class Worker(abc.ABC):
    """One stage of a pipeline. Subclass it and implement `forward`.

    With ``max_batch_size == 1`` `forward` gets one item and returns one result; with
    a larger ``max_batch_size`` it gets a list of items and must return a list of the
    same length, result ``i`` for item ``i``.

    Raise a `natserve.errors` exception to choose an item's outcome (`ValidationError`
    for 422, `ClientError` for 400, `ServerError` for 500). One bad item never fails its
    batch-mates: when a batching ``forward`` raises, natserve re-runs the batch split in
    halves until the failing items are alone, so ``forward`` may see an item twice.

    Class attributes (Mosec's):
        example: what `forward` is called with once before the worker takes traffic,
            exactly as given (a batching stage's example is therefore already a list).
        multi_examples: a list of such arguments, each passed to `forward` in turn; used
            instead of ``example`` when both are set, as in Mosec.
        strict_warmup: natserve's own. False (Mosec's behaviour): a warm-up that raises
            is logged and the worker serves anyway. True: the worker process exits
            instead of reporting ready, and the agent restarts it.
        req_mime_type: the media type the first stage expects (documentation only).
        resp_mime_type: the ``Content-Type`` of the last stage's responses.
    """

    example: Any = None
    multi_examples: Optional[List[Any]] = None
    strict_warmup: bool = False
    req_mime_type: str = "application/json"
    resp_mime_type: str = "application/json"

    #: Set by a class natserve cannot serve yet; `Server.append_worker` refuses it with
    #: this text (why, and what to do instead).
    _natserve_unsupported: Optional[str] = None

    _worker_id: int = 0
    _stage: int = 0
    _max_batch_size: int = 1
    #: The ``forward`` call running now, set by the worker process around each call.
    _natserve_call: Optional[ForwardCall] = None

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
        """Between stages: one `forward` result to bytes for the next stage. msgpack,
        with ``numpy.ndarray`` (numeric dtypes) carried as an extension type."""
        return _ipc.pack(data)

    def deserialize_ipc(self, data: bytes) -> Any:
        """Between stages: the previous stage's bytes to one `forward` input. msgpack."""
        return _ipc.unpack(data)

    @property
    def request_ids(self) -> List[str]:
        """The request ids (what the ingress echoes as ``X-Request-Id``, with a suffix
        when the caller chose it) of the items the running ``forward`` got, in input
        order; empty outside a request (warm-up). natserve's log lines of the request
        carry them already; these are for the worker's own. natserve's own."""
        return _logging.request_ids()

    @property
    def trace_ids(self) -> List[str]:
        """The trace ids (the trace-id field of the W3C ``traceparent`` a request came
        with; ``""`` for one without) of the items the running ``forward`` got, in input
        order; empty outside a request. natserve's own."""
        return _logging.trace_ids()

    def is_cancelled(self, index: int = 0) -> bool:
        """Whether the requester of item ``index`` of the running ``forward`` call went
        away (its HTTP client disconnected): check it in a long loop and stop early. The
        index is the item's position in ``forward``'s input (0 without batching). False
        outside a request (warm-up). natserve's own; Mosec has no equivalent."""
        call = self._natserve_call
        return call is not None and call.is_cancelled(index)

    @abc.abstractmethod
    def forward(self, data: Any) -> Any:
        """The model: one input to one output, or (batching) a list to a list."""
        raise NotImplementedError

    @classmethod
    def get_forward_json_schema(
        cls, target: ParseTarget, ref_template: str
    ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Mosec's hook for the OpenAPI document: the JSON schema of `forward`'s input
        (``ParseTarget.INPUT``) or return value (``ParseTarget.RETURN``), and the
        component schemas it refers to through ``ref_template``.

        Empty by default; `natserve.mixin.TypedMsgPackMixin` derives it from the type
        annotations. natserve's ingress does not serve an OpenAPI document yet, so only
        your own code calls this.
        """
        return {}, {}


class SSEWorker(Worker):
    """Mosec's Server-Sent Events worker: `forward` streams with `send_stream_event`.

    It must be the last stage of its route. Each event reaches the HTTP client as it is
    sent (``data: <text>``); what `forward` returns is not sent, as in Mosec, and an
    exception ends the stream with an ``event: error``. With batching, every item of the
    batch streams on its own: pass its position as ``index``.
    """

    resp_mime_type = "text/event-stream"

    def send_stream_event(self, text: str, index: int = 0) -> None:
        """Sends ``text`` (UTF-8) as one event to the client of batch item ``index`` (its
        position in `forward`'s input; 0 without batching). An event for an item whose
        client went away is dropped (see `is_cancelled`); outside a request (warm-up) every
        event is."""
        call = self._natserve_call
        if call is None:
            if not isinstance(text, str):
                raise TypeError(
                    f"send_stream_event: text must be a str (UTF-8 text), got {type(text).__name__}"
                )
            return
        call.send_event(text, index)
