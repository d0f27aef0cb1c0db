"""What a running batch exchanges with its agent besides BATCH and RESULTS: stream events
out (``SSEWorker.send_stream_event``), cancellations in (``Worker.is_cancelled``).

``forward`` runs on the worker process's main thread; a reader thread (`natserve._worker`)
takes every frame the agent sends, so a CANCEL reaches `Running` while ``forward`` runs.
STREAM frames are written from whatever thread calls ``send_stream_event``, under the
same lock as the batch's RESULTS, which the main thread writes only after ``forward``
returned: so every event of a batch reaches the agent before the results that end it.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Set

from ._protocol import Connection, Frame, Stream

#: Batches whose cancels are remembered at once; the agent cancels only what runs, so
#: more means a confused peer, and the oldest are forgotten.
MAX_REMEMBERED = 16


class Running:
    """The batch this worker process runs now, shared by its main and reader threads."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._write = threading.Lock()
        self._lock = threading.Lock()
        self._batch: Optional[int] = None
        self._finished = 0  # id of the last batch answered (ids only grow)
        self._cancelled: Dict[int, Set[int]] = {}
        self._streamed: Set[int] = set()

    def write(self, frame: Frame) -> None:
        with self._write:
            self._conn.write_frame(frame)

    def start(self, batch_id: int) -> None:
        with self._lock:
            self._batch = batch_id
            self._streamed = set()

    def finish(self) -> None:
        with self._lock:
            if self._batch is not None:
                self._finished = max(self._finished, self._batch)
                self._cancelled.pop(self._batch, None)
            self._batch = None

    def cancel(self, batch_id: int, index: int) -> None:
        """The agent's word that item ``index`` of ``batch_id`` lost its requester; a
        cancel for a batch already answered changes nothing."""
        with self._lock:
            if batch_id <= self._finished:
                return
            self._cancelled.setdefault(batch_id, set()).add(index)
            while len(self._cancelled) > MAX_REMEMBERED:
                del self._cancelled[min(self._cancelled)]

    def is_cancelled(self, item: int) -> bool:
        with self._lock:
            return self._batch is not None and item in self._cancelled.get(self._batch, ())

    def streamed(self, item: int) -> bool:
        """Whether item ``item`` of the running batch has sent an event already."""
        with self._lock:
            return item in self._streamed

    def send_event(self, item: int, body: bytes) -> None:
        """Sends one event of item ``item``'s stream, unless its requester went away."""
        with self._lock:
            batch = self._batch
            if batch is None or item in self._cancelled.get(batch, ()):
                return
            self._streamed.add(item)
        self.write(Stream(id=batch, index=item, body=body))


class ForwardCall:
    """One ``forward`` call: which items of the running batch its arguments are, so the
    ``index`` a worker passes (the position in what ``forward`` got) finds its item."""

    def __init__(self, running: Running, items: Sequence[int]) -> None:
        self._running = running
        self._items: List[int] = list(items)

    def item(self, index: int, where: str) -> int:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"{where}: index must be an int, got {index!r}")
        if not 0 <= index < len(self._items):
            raise IndexError(
                f"{where}: index {index} is not an item of this forward call, which got "
                f"{len(self._items)} (use 0..{len(self._items) - 1}, the position in its input)"
            )
        return self._items[index]

    def is_cancelled(self, index: int) -> bool:
        return self._running.is_cancelled(self.item(index, "is_cancelled"))

    def send_event(self, text: str, index: int) -> None:
        if not isinstance(text, str):
            raise TypeError(
                f"send_stream_event: text must be a str (UTF-8 text), got {type(text).__name__}"
            )
        item = self.item(index, "send_stream_event")
        self._running.send_event(item, text.encode("utf-8"))
