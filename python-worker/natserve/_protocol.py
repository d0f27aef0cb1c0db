"""The frame codec spoken between an agent and this worker process over a Unix socket.

This mirrors ``protocol/src/frame.rs`` and ``connection.rs`` byte for byte::

    frame   = length:u32be kind:u8 body          length counts kind + body
    READY   kind 1  pid:u32be [reads:u8 = 1|3]
    BATCH   kind 2  id:u64be count:u32be (len:u32be bytes){count}
    BATCH   kind 6  id:u64be count:u32be (len:u32be bytes rlen:u16be request_id
                    tlen:u16be trace_id){count}
    BATCH   kind 7  id:u64be count:u32be (len:u32be bytes rlen:u16be request_id
                    tlen:u16be trace_id edge:u8){count}
    RESULTS kind 3  id:u64be count:u32be (status:u8 len:u32be bytes){count}
    STREAM  kind 4  id:u64be index:u32be len:u32be bytes     worker -> agent
    CANCEL  kind 5  id:u64be index:u32be                     agent -> worker

Kind 6 is a batch carrying each item's request id and trace id (UTF-8, empty when
none), with at least one item. This worker says in its READY (the optional last byte, 1)
that it reads kind 6, and the agent sends kind 6 only to a worker that said so; kind 2 is
a batch without ids.

Kind 7 is kind 6 with each item's edge: `EDGE_FIRST` when the item is at the first stage
of its own route (decoded with ``deserialize``), `EDGE_LAST` at the last (encoded with
``serialize``), both or neither. A stage shared by routes that place it differently gets
it; every other batch's items stand where the worker's own stage does. This worker's
READY ends with 3: it reads kinds 6 and 7.

The declared length is checked against a maximum before anything is read or allocated,
and every inner length against what is left of the frame. ``tests/golden/frames.json``
holds byte vectors both codecs are tested against.
"""

from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

KIND_READY = 1
KIND_BATCH = 2
KIND_RESULTS = 3
KIND_STREAM = 4
KIND_CANCEL = 5
KIND_BATCH_IDS = 6
KIND_BATCH_EDGES = 7

#: A kind 7 item's edge bits: at the first, at the last stage of its own route.
EDGE_FIRST = 1
EDGE_LAST = 2
_READS_IDS = 1
_READS_EDGES = 3

#: Largest frame accepted by default: big enough for a batch of large NATS payloads.
DEFAULT_MAX_FRAME = 256 * 1024 * 1024

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")
_HEADER = struct.Struct(">IB")


class Status(enum.IntEnum):
    """Per-item status of a RESULTS frame; its name is the outcome's wire name."""

    OK = 0
    VALIDATION_ERROR = 1
    CLIENT_ERROR = 2
    SERVER_ERROR = 3

    @property
    def outcome(self) -> str:
        """The outcome string used in the `X-Status` header (`ok`, `client_error`, ...)."""
        return self.name.lower()


class FrameError(Exception):
    """A frame that breaks the codec's rules (too large, unknown kind, malformed)."""


class CutFrameError(FrameError):
    """The peer closed the connection in the middle of a frame."""


@dataclass(frozen=True)
class Ready:
    """Worker -> agent, sent once after ``__init__`` and warm-up succeeded;
    ``reads_ids``: this worker reads batches with ids (BATCH kind 6); ``reads_edges``:
    with each item's edge too (kind 7; implies ``reads_ids``)."""

    pid: int
    reads_ids: bool = False
    reads_edges: bool = False


@dataclass(frozen=True)
class Batch:
    """Agent -> worker: one raw payload per request, and (kind 6) each one's request id
    and trace id, ``""`` where it has none; ``ids`` is empty in a batch without them.
    ``edges`` (kind 7): each item's `EDGE_FIRST`/`EDGE_LAST` bits, or empty."""

    id: int
    items: List[bytes] = field(default_factory=list)
    ids: List[Tuple[str, str]] = field(default_factory=list)
    edges: List[int] = field(default_factory=list)


@dataclass(frozen=True)
class ItemResult:
    """One item's outcome and body (the serialized output or the error message)."""

    status: Status
    body: bytes


@dataclass(frozen=True)
class Results:
    """Worker -> agent: exactly one result per item of the batch with the same id."""

    id: int
    items: List[ItemResult] = field(default_factory=list)


@dataclass(frozen=True)
class Stream:
    """Worker -> agent, before the batch's RESULTS: one event of item ``index``'s stream."""

    id: int
    index: int
    body: bytes


@dataclass(frozen=True)
class Cancel:
    """Agent -> worker: the requester of item ``index`` of running batch ``id`` went away."""

    id: int
    index: int


Frame = Union[Ready, Batch, Results, Stream, Cancel]


def check(buf: bytes | bytearray | memoryview, max_frame: int = DEFAULT_MAX_FRAME) -> Optional[int]:
    """Returns the total size of the whole frame at the start of ``buf``, or ``None`` when
    more bytes are needed. Rejects an oversized or empty declared length right away."""
    if len(buf) < 4:
        return None
    (length,) = _U32.unpack_from(buf, 0)
    if length > max_frame:
        raise FrameError(f"frame of {length} bytes exceeds the maximum of {max_frame}")
    if length == 0:
        raise FrameError("empty frame")
    return 4 + length if len(buf) >= 4 + length else None


class _Reader:
    """A cursor over one frame's body that never reads past its end."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def u8(self, what: str) -> int:
        if self.remaining() < 1:
            raise FrameError(f"malformed frame: truncated {what}")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def u32(self) -> int:
        if self.remaining() < 4:
            raise FrameError("malformed frame: truncated u32")
        (value,) = _U32.unpack_from(self._data, self._pos)
        self._pos += 4
        return int(value)

    def u64(self) -> int:
        if self.remaining() < 8:
            raise FrameError("malformed frame: truncated u64")
        (value,) = _U64.unpack_from(self._data, self._pos)
        self._pos += 8
        return int(value)

    def count(self, min_item_size: int) -> int:
        """An item count that could fit in what is left, so a lying count allocates nothing."""
        n = self.u32()
        if n * min_item_size > self.remaining():
            raise FrameError("malformed frame: item count exceeds frame")
        return n

    def bytes_(self) -> bytes:
        n = self.u32()
        if n > self.remaining():
            raise FrameError("malformed frame: item length exceeds frame")
        value = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return value

    def short_text(self) -> str:
        """An id with a u16 length, as text (UTF-8, or the frame is malformed)."""
        if self.remaining() < 2:
            raise FrameError("malformed frame: truncated u16")
        (n,) = _U16.unpack_from(self._data, self._pos)
        self._pos += 2
        if n > self.remaining():
            raise FrameError("malformed frame: id length exceeds frame")
        try:
            value = bytes(self._data[self._pos : self._pos + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("malformed frame: id is not UTF-8") from None
        self._pos += n
        return value

    def finish(self) -> None:
        if self.remaining():
            raise FrameError("malformed frame: trailing bytes")


def parse(frame: bytes | bytearray | memoryview) -> Frame:
    """Parses one whole frame, length prefix included, as sized by :func:`check`. Any other
    input raises `FrameError`: the prefix must match the frame's length."""
    if len(frame) < 4:
        raise FrameError("malformed frame: shorter than a length prefix")
    (length,) = _U32.unpack_from(frame, 0)
    if length != len(frame) - 4:
        raise FrameError("malformed frame: length prefix does not match the frame")
    return _parse_body(memoryview(frame)[4:])


def _parse_body(body: memoryview) -> Frame:
    """Parses a frame's kind byte and body (everything after the length prefix)."""
    if len(body) == 0:
        raise FrameError("empty frame")
    reader = _Reader(body)
    kind = reader.u8("kind")
    if kind == KIND_READY:
        pid = reader.u32()
        reads = reader.u8("READY feature") if reader.remaining() else None
        if reads not in (None, _READS_IDS, _READS_EDGES):
            raise FrameError("malformed frame: unknown READY feature")
        reader.finish()
        return Ready(pid=pid, reads_ids=reads is not None, reads_edges=reads == _READS_EDGES)
    if kind == KIND_BATCH:
        batch_id = reader.u64()
        items = [reader.bytes_() for _ in range(reader.count(4))]
        reader.finish()
        return Batch(id=batch_id, items=items)
    if kind in (KIND_BATCH_IDS, KIND_BATCH_EDGES):
        with_edges = kind == KIND_BATCH_EDGES
        batch_id = reader.u64()
        count = reader.count(9 if with_edges else 8)
        if count == 0:
            # Without items it is kind 2: one frame, one encoding.
            raise FrameError("malformed frame: batch with ids of no item")
        items = []
        ids: List[Tuple[str, str]] = []
        edges: List[int] = []
        for _ in range(count):
            items.append(reader.bytes_())
            ids.append((reader.short_text(), reader.short_text()))
            if with_edges:
                edge = reader.u8("edge")
                if edge & ~(EDGE_FIRST | EDGE_LAST):
                    raise FrameError("malformed frame: unknown edge bits")
                edges.append(edge)
        reader.finish()
        return Batch(id=batch_id, items=items, ids=ids, edges=edges)
    if kind == KIND_RESULTS:
        results_id = reader.u64()
        results: List[ItemResult] = []
        for _ in range(reader.count(5)):
            code = reader.u8("item")
            try:
                status = Status(code)
            except ValueError:
                raise FrameError(f"unknown item status {code}") from None
            results.append(ItemResult(status=status, body=reader.bytes_()))
        reader.finish()
        return Results(id=results_id, items=results)
    if kind == KIND_STREAM:
        stream = Stream(id=reader.u64(), index=reader.u32(), body=reader.bytes_())
        reader.finish()
        return stream
    if kind == KIND_CANCEL:
        cancel = Cancel(id=reader.u64(), index=reader.u32())
        reader.finish()
        return cancel
    raise FrameError(f"unknown frame kind {kind}")


def encode(frame: Frame) -> bytes:
    """The frame's bytes, length prefix included."""
    parts: List[bytes] = []
    if isinstance(frame, Ready):
        parts.append(_U32.pack(frame.pid))
        if frame.reads_edges:
            parts.append(bytes([_READS_EDGES]))
        elif frame.reads_ids:
            parts.append(bytes([_READS_IDS]))
        kind = KIND_READY
    elif isinstance(frame, Batch) and not frame.ids and not frame.edges:
        parts += [_U64.pack(frame.id), _U32.pack(len(frame.items))]
        for item in frame.items:
            parts += [_U32.pack(len(item)), bytes(item)]
        kind = KIND_BATCH
    elif isinstance(frame, Batch):
        parts += [_U64.pack(frame.id), _U32.pack(len(frame.items))]
        for i, item in enumerate(frame.items):
            request_id, trace_id = frame.ids[i] if i < len(frame.ids) else ("", "")
            parts += [_U32.pack(len(item)), bytes(item), _short(request_id), _short(trace_id)]
            if frame.edges:
                parts.append(bytes([frame.edges[i] if i < len(frame.edges) else 0]))
        kind = KIND_BATCH_EDGES if frame.edges else KIND_BATCH_IDS
    elif isinstance(frame, Stream):
        body = bytes(frame.body)
        parts += [_U64.pack(frame.id), _U32.pack(frame.index), _U32.pack(len(body)), body]
        kind = KIND_STREAM
    elif isinstance(frame, Cancel):
        parts += [_U64.pack(frame.id), _U32.pack(frame.index)]
        kind = KIND_CANCEL
    else:
        parts += [_U64.pack(frame.id), _U32.pack(len(frame.items))]
        for result in frame.items:
            parts += [bytes([int(result.status)]), _U32.pack(len(result.body)), result.body]
        kind = KIND_RESULTS
    payload = b"".join(parts)
    return _HEADER.pack(len(payload) + 1, kind) + payload


def _short(text: str) -> bytes:
    """An id with its u16 length; one that does not fit travels empty."""
    data = text.encode("utf-8")
    return _U16.pack(len(data)) + data if len(data) <= 0xFFFF else _U16.pack(0)


class Connection:
    """Frames over a connected stream socket.

    ``read_frame`` returns ``None`` on a clean end of stream between frames and raises
    :class:`CutFrameError` on one in the middle of a frame. ``poll_frames`` takes what
    has arrived without waiting (a worker looks for a CANCEL while its ``forward`` runs);
    the bytes of a frame it could not finish stay for the next read.
    """

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._sock = sock
        self._max_frame = max_frame
        #: Read by `poll_frames`, not yet part of a returned frame.
        self._ahead = bytearray()
        #: `poll_frames` saw the peer close.
        self._closed = False

    def _read_into(self, buf: bytearray) -> int:
        """Fills ``buf`` unless the peer closes first; returns how many bytes arrived."""
        view = memoryview(buf)
        got = min(len(self._ahead), len(buf))
        if got:
            view[:got] = self._ahead[:got]
            del self._ahead[:got]
        while got < len(buf) and not self._closed:
            n = self._sock.recv_into(view[got:], len(buf) - got)
            if n == 0:
                break
            got += n
        return got

    def poll_frames(self) -> List[Frame]:
        """The whole frames that have arrived, without waiting for more."""
        # A socket with a timeout would wait for readiness first, whatever the flags say.
        timeout = self._sock.gettimeout()
        if timeout is not None:
            self._sock.settimeout(0)
        try:
            while not self._closed:
                try:
                    chunk = self._sock.recv(65536, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                if not chunk:
                    self._closed = True
                    break
                self._ahead += chunk
        finally:
            if timeout is not None:
                self._sock.settimeout(timeout)
        frames: List[Frame] = []
        while (size := check(self._ahead, self._max_frame)) is not None:
            frames.append(_parse_body(memoryview(bytes(self._ahead[4:size]))))
            del self._ahead[:size]
        return frames

    def read_frame(self) -> Optional[Frame]:
        prefix = bytearray(4)
        got = self._read_into(prefix)
        if got == 0:
            return None
        if got < 4:
            raise CutFrameError("connection closed in the middle of a frame")
        # Checked before the body's buffer is allocated: a hostile length costs nothing.
        check(prefix, self._max_frame)
        (length,) = _U32.unpack_from(prefix, 0)
        body = bytearray(length)
        if self._read_into(body) < length:
            raise CutFrameError("connection closed in the middle of a frame")
        return _parse_body(memoryview(body))

    def write_frame(self, frame: Frame) -> None:
        self._sock.sendall(encode(frame))

    def close(self) -> None:
        self._sock.close()
