"""Mosec's multi-route service: two routes share the batching Runtime `count`, one with
typed msgpack at both ends, one with raw bytes in and JSON out."""

from typing import Any, List

from msgspec import Struct

from natserve import Runtime, Server, Worker
from natserve.mixin import TypedMsgPackMixin


class Blob(Struct):
    bin: bytes
    name: str = "test"


class TypedIn(TypedMsgPackMixin, Worker):
    def forward(self, req: Blob) -> bytes:
        return req.bin


class RawIn(Worker):
    def deserialize(self, data: bytes) -> bytes:
        return data

    def forward(self, data: bytes) -> bytes:
        return data


class Count(Worker):
    def forward(self, batch: List[bytes]) -> List[Any]:
        return [{"length": len(item)} for item in batch]


class TypedOut(TypedMsgPackMixin, Worker):
    def forward(self, data: Any) -> Any:
        return data


if __name__ == "__main__":
    count = Runtime(Count, max_batch_size=16)
    server = Server()
    server.register_runtime(
        {
            "/v1/inference": [Runtime(TypedIn), count, Runtime(TypedOut)],
            "/inference": [Runtime(RawIn), count],
        }
    )
    server.run()
