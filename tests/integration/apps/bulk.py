"""A two-stage pipeline of raw bytes, for the large-payload tests.

`Flip` (stage 0) reverses the body; `Stamp` (stage 1) reverses it back and appends
b"|stamped". So a body B answers B + b"|stamped", whatever its size. A body starting with
b"huge-mid" makes `Flip` hand on a result of `BULK_HUGE_BYTES`; one starting with
b"huge-end" makes `Stamp` answer one that size.
"""

from __future__ import annotations

import os

from natserve import Server, Worker

HUGE = int(os.environ.get("BULK_HUGE_BYTES", str(48 * 1024 * 1024)))


class Flip(Worker):
    def deserialize(self, data: bytes) -> bytes:
        return data

    def forward(self, data: bytes) -> bytes:
        if data.startswith(b"huge-mid"):
            return b"m" * HUGE
        return data[::-1]


class Stamp(Worker):
    def forward(self, data: bytes) -> bytes:
        if data.endswith(b"dne-eguh"):  # b"huge-end", reversed by Flip
            return b"e" * HUGE
        return data[::-1] + b"|stamped"

    def serialize(self, data: bytes) -> bytes:
        return data


if __name__ == "__main__":
    server = Server()
    server.append_worker(Flip)
    server.append_worker(Stamp)
    server.run()
