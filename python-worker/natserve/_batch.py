"""Running one BATCH through a `Worker`: decode, forward, encode, one result per item.

One bad item never fails its batch-mates:

- a ``deserialize``/``deserialize_ipc`` failure is that item's own result, and the item
  is left out of the batch given to ``forward``;
- when ``forward`` raises on a batch of n > 1 items, the batch is run again split in two
  halves, recursively, until the failing item(s) are isolated in batches of one; the
  others get their results (so ``forward`` may see an item more than once and should not
  have side effects that matter when repeated). A single bad item in a batch of n costs
  about 2·log2(n) extra ``forward`` calls;
- a batching ``forward`` that returns anything but a list or tuple of the batch's length
  fails every item of that call with a message saying so;
- a ``serialize``/``serialize_ipc`` failure is that item's own result;
- a streaming item (one that already sent an event) is never run again: when its
  ``forward`` call raises, the exception is its answer, and only its batch-mates that
  have streamed nothing yet are retried in halves.

Error bodies start with the prefixes docs/protocol.md lists; the traceback of a server
error goes to the log, never to the client.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Tuple

from ._logging import RUNNING
from ._protocol import EDGE_FIRST, EDGE_LAST, ItemResult, Status
from ._running import ForwardCall, Running
from ._worker_base import Worker
from .errors import (
    ClientError,
    DecodingError,
    EncodingError,
    NatserveError,
    ServerError,
    ValidationError,
)

logger = logging.getLogger("natserve.worker")

#: Longest error message sent to the client; the rest is only in the log.
MAX_MESSAGE_CHARS = 200


def _message(err: BaseException, fallback: str) -> str:
    text = str(err)
    if not text and err.__cause__ is not None:
        # Mosec style `raise DecodingError from err` carries its reason in the cause.
        cause = err.__cause__
        text = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return text or fallback


def _truncate(text: str) -> str:
    text = " ".join(text.split("\n"))
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + "..."
    return text


def error_result(err: BaseException, during: str) -> ItemResult:
    """The result an exception raised by user code stands for (and its one log line)."""
    status = Status.SERVER_ERROR
    if isinstance(err, ValidationError):
        status, body = Status.VALIDATION_ERROR, "validation error: " + _message(err, "invalid data")
    elif isinstance(err, DecodingError):
        status = Status.CLIENT_ERROR
        body = "decoding error: " + _message(err, "cannot deserialize the request body")
    elif isinstance(err, ClientError):
        status, body = Status.CLIENT_ERROR, "client error: " + _message(err, "bad request")
    elif isinstance(err, EncodingError):
        body = "encoding error: " + _message(err, "cannot serialize the result")
    elif isinstance(err, (ServerError, NatserveError)):
        body = "server error: " + _message(err, "the worker failed")
    else:
        text = str(err)
        body = f"internal error: {type(err).__name__}" + (f": {text}" if text else "")
    if status == Status.SERVER_ERROR:
        logger.error("%s failed: %s", during, body, exc_info=err)
    else:
        logger.debug("%s rejected an item: %s", during, body)
    return ItemResult(status=status, body=_truncate(body).encode("utf-8", "replace"))


class BatchRunner:
    """Turns the payloads of one BATCH into its RESULTS items for one worker."""

    def __init__(
        self, worker: Worker, *, first: bool, last: bool, running: Optional[Running] = None
    ) -> None:
        self._worker = worker
        self._first_stage = first
        self._last_stage = last
        self._batched = worker.max_batch_size > 1
        self._running = running
        #: The running batch's item edges (BATCH kind 7), or empty: every item then
        #: stands where this worker's stage does.
        self._edges: Sequence[int] = ()

    def _first(self, item: int) -> bool:
        """Whether item ``item`` is at the first stage of its route (decoded from HTTP)."""
        if item < len(self._edges):
            return bool(self._edges[item] & EDGE_FIRST)
        return self._first_stage

    def _last(self, item: int) -> bool:
        """Whether item ``item`` is at the last stage of its route (its answer is HTTP)."""
        if item < len(self._edges):
            return bool(self._edges[item] & EDGE_LAST)
        return self._last_stage

    def _forward(self, items: Sequence[int], data: Any) -> Any:
        """`forward` on ``data``, which is the batch's items ``items``."""
        if self._running is None:
            return self._worker.forward(data)
        self._worker._natserve_call = ForwardCall(self._running, items)
        try:
            return self._worker.forward(data)
        finally:
            self._worker._natserve_call = None

    def _streamed(self, item: int) -> bool:
        return self._running is not None and self._running.streamed(item)

    def run(
        self,
        payloads: Sequence[bytes],
        ids: Sequence[Tuple[str, str]] = (),
        edges: Sequence[int] = (),
    ) -> List[ItemResult]:
        """``ids``: each item's (request id, trace id), or none; what is logged while an
        item is decoded, run or encoded carries its ids. ``edges``: each item's place in
        its own route (a stage shared by routes that place it differently), or none."""
        RUNNING.ids = ids if len(ids) == len(payloads) else ()
        self._edges = edges if len(edges) == len(payloads) else ()
        try:
            return self._run(payloads)
        finally:
            RUNNING.ids, RUNNING.items = (), ()
            self._edges = ()

    def _run(self, payloads: Sequence[bytes]) -> List[ItemResult]:
        results: List[Optional[ItemResult]] = [None] * len(payloads)
        inputs: List[Tuple[int, Any]] = []
        for i, raw in enumerate(payloads):
            RUNNING.items = (i,)
            first = self._first(i)
            decode = self._worker.deserialize if first else self._worker.deserialize_ipc
            during = "deserialize" if first else "deserialize_ipc"
            try:
                inputs.append((i, decode(raw)))
            except Exception as err:
                results[i] = error_result(err, during)
        if self._batched:
            self._forward_batch(inputs, results)
        else:
            for i, data in inputs:
                RUNNING.items = (i,)
                try:
                    output = self._forward([i], data)
                except Exception as err:
                    results[i] = error_result(err, "forward")
                    continue
                results[i] = self._encode(i, output)
        done: List[ItemResult] = []
        for result in results:
            if result is None:  # unreachable: every path above sets each item
                result = ItemResult(Status.SERVER_ERROR, b"internal error: item lost")
            done.append(result)
        return done

    def _forward_batch(
        self, inputs: Sequence[Tuple[int, Any]], results: List[Optional[ItemResult]]
    ) -> None:
        if not inputs:
            return
        outer = RUNNING.items
        RUNNING.items = [i for i, _ in inputs]
        try:
            self._forward_inputs(inputs, results)
        finally:
            RUNNING.items = outer

    def _forward_inputs(
        self, inputs: Sequence[Tuple[int, Any]], results: List[Optional[ItemResult]]
    ) -> None:
        try:
            outputs = self._forward([i for i, _ in inputs], [data for _, data in inputs])
        except Exception as err:
            if len(inputs) == 1:
                results[inputs[0][0]] = error_result(err, "forward")
                return
            # A client that saw part of its stream would see it again: answered now.
            streamed = [i for i, _ in inputs if self._streamed(i)]
            if streamed:
                for i in streamed:
                    results[i] = error_result(err, "forward")
                self._forward_batch([x for x in inputs if x[0] not in streamed], results)
                return
            logger.debug(
                "forward raised %s on a batch of %d; retrying in halves",
                type(err).__name__,
                len(inputs),
            )
            mid = len(inputs) // 2
            self._forward_batch(inputs[:mid], results)
            self._forward_batch(inputs[mid:], results)
            return
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(inputs):
            got = (
                f"a {type(outputs).__name__} of {len(outputs)}"
                if isinstance(outputs, (list, tuple))
                else f"a {type(outputs).__name__}"
            )
            body = (
                f"internal error: forward returned {got} for a batch of {len(inputs)}; "
                "with max_batch_size > 1 it must return a list with one result per item"
            )
            logger.error("%s", body)
            for i, _ in inputs:
                results[i] = ItemResult(Status.SERVER_ERROR, body.encode())
            return
        for (i, _), output in zip(inputs, outputs):
            results[i] = self._encode(i, output)

    def _encode(self, item: int, output: Any) -> ItemResult:
        last = self._last(item)
        encode = self._worker.serialize if last else self._worker.serialize_ipc
        during = "serialize" if last else "serialize_ipc"
        try:
            body = encode(output)
            if not isinstance(body, (bytes, bytearray, memoryview)):
                raise EncodingError(
                    f"{during} returned {type(body).__name__}; it must return bytes"
                )
        except Exception as err:
            return error_result(err, during)
        return ItemResult(Status.OK, bytes(body))
