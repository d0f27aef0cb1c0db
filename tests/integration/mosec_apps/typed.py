"""Mosec's typed service: msgpack bodies validated into a msgspec Struct, batched."""

from typing import List

from msgspec import Struct

from natserve import Server, Worker
from natserve.mixin import TypedMsgPackMixin


class Media(Struct):
    media: str
    binary: bytes


class Length(TypedMsgPackMixin, Worker):
    def forward(self, batch: List[Media]) -> List[int]:
        return [len(item.binary) for item in batch]


if __name__ == "__main__":
    server = Server()
    server.append_worker(Length, max_batch_size=4)
    server.run()
