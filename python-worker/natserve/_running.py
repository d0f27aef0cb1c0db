"""What a running batch exchanges with its agent besides BATCH and RESULTS: stream events
out (``SSEWorker.send_stream_event``), cancellations in (``Worker.is_cancelled``).

``forward`` runs on the worker process's main thread, which reads the agent's frames
itself between batches (`natserve._worker`). While a batch runs, nobody waits on the
socket: ``is_cancelled`` and ``send_stream_event`` first take whatever the agent sent
meanwhile, without waiting, so a CANCEL reaches the ``forward`` that asks. A batch
nobody asks about costs no thread and no system call for it.
STREAM frames are written from whatever thread calls ``send_stream_event``, under the
same lock as the batch's RESULTS, which the main thread writes only after ``forward``
returned: so every event of a batch reaches the agent before the results that end it.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Deque, Dict, List, Optional, Sequence, Set

from ._protocol import Cancel, Connection, Frame, FrameError, Stream

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
        #: One reader of the socket at a time: the main loop between batches, or a poll.
        self._read = threading.Lock()
        #: Frames a poll took that are not CANCELs, for the main loop, in order.
        self._early: Deque[Frame] = deque()
        #: Why a poll could not read the socket; the main loop raises it.
        self._broken: Optional[Exception] = None

    def next_frame(self) -> Optional[Frame]:
        """The agent's next frame for the main loop, which runs no batch now: one a poll
        took already, else the socket's next (``None`` when the agent closed it)."""
        if self._early:
            return self._early.popleft()
        if self._broken is not None:
            raise self._broken
        with self._read:
            return self._conn.read_frame()

    def _poll(self) -> None:
        """Takes what the agent sent while the batch runs, without waiting: a CANCEL
        applies at once, anything else waits for the main loop."""
        if not self._read.acquire(blocking=False):
            return
        try:
            frames = self._conn.poll_frames()
        except (OSError, FrameError) as err:
            self._broken = self._broken or err
            frames = []
        finally:
            self._read.release()
        for frame in frames:
            if isinstance(frame, Cancel):
                self.cancel(frame.id, frame.index)
            else:
                self._early.append(frame)

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
        if self._batch is not None:
            self._poll()
        with self._lock:
            return self._batch is not None and item in self._cancelled.get(self._batch, ())

    def streamed(self, item: int) -> bool:
        """Whether item ``item`` of the running batch has sent an event already."""
        with self._lock:
            return item in self._streamed

    def send_event(self, item: int, body: bytes) -> None:
        """Sends one event of item ``item``'s stream, unless its requester went away."""
        self._poll()
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
