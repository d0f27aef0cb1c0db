"""Several NATS messages carried in one: an envelope of letters, each with its own
headers and body. This mirrors ``protocol/src/envelope.rs`` byte for byte::

    envelope = count:u16be letter{count}                     count >= 1
    letter   = nhead:u16be (klen:u16be key vlen:u16be value){nhead} blen:u32be body

The message carrying an envelope has the header ``X-Envelope`` (its letter count). An
agent answering several requests of one requester at once sends their replies this way,
to the reply subject of the first, when the requester's work messages say
``X-Reply-Envelope: 1``. ``tests/golden/envelopes.json`` holds the byte vectors both
codecs are tested against.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

#: Header of a message that carries an envelope: its letter count.
ENVELOPE = "X-Envelope"
#: Header of a work message whose requester reads envelopes of replies.
REPLY_ENVELOPE = "X-Reply-Envelope"

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class EnvelopeError(ValueError):
    """Bytes that are not one whole envelope."""


@dataclass(frozen=True)
class Letter:
    """One message of an envelope: its headers, in order (a name may repeat), and body."""

    headers: List[Tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> Optional[str]:
        """The first value of header ``name`` (case-insensitive), if any."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)


def encode(letters: Sequence[Letter]) -> bytes:
    if not 1 <= len(letters) <= 0xFFFF:
        raise EnvelopeError(f"an envelope holds 1 to 65535 letters, not {len(letters)}")
    parts = [_U16.pack(len(letters))]
    for letter in letters:
        parts.append(_U16.pack(len(letter.headers)))
        for name, value in letter.headers:
            for text in (name, value):
                data = text.encode("utf-8")
                if len(data) > 0xFFFF:
                    raise EnvelopeError("a header over 64 KiB")
                parts += [_U16.pack(len(data)), data]
        parts += [_U32.pack(len(letter.body)), bytes(letter.body)]
    return b"".join(parts)


def decode(data: bytes) -> List[Letter]:
    """The letters of ``data``; anything but one whole envelope raises `EnvelopeError`."""
    view = memoryview(data)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if len(view) - pos < n:
            raise EnvelopeError(f"malformed envelope: truncated {what}")
        chunk = view[pos : pos + n]
        pos += n
        return chunk

    def text(what: str) -> str:
        (n,) = _U16.unpack(take(2, what))
        try:
            return bytes(take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError(f"malformed envelope: {what} not UTF-8") from None

    (count,) = _U16.unpack(take(2, "count"))
    if count == 0:
        raise EnvelopeError("malformed envelope: no letters")
    if count * 6 > len(view) - pos:
        raise EnvelopeError("malformed envelope: letter count exceeds the envelope")
    letters = []
    for _ in range(count):
        (nhead,) = _U16.unpack(take(2, "header count"))
        if nhead * 4 > len(view) - pos:
            raise EnvelopeError("malformed envelope: header count exceeds the envelope")
        headers = [(text("header name"), text("header value")) for _ in range(nhead)]
        (size,) = _U32.unpack(take(4, "body length"))
        letters.append(Letter(headers=headers, body=bytes(take(size, "body"))))
    if pos != len(view):
        raise EnvelopeError("malformed envelope: trailing bytes")
    return letters
