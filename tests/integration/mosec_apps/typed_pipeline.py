"""Mosec's examples/type_validation: a typed first stage that stops bad requests early,
then a batching stage answering in msgpack."""

from typing import Any, List

from msgspec import Struct

from natserve import Server, Worker
from natserve.mixin import TypedMsgPackMixin


class Upload(Struct):
    bin: bytes
    name: str = "test"


class Validate(TypedMsgPackMixin, Worker):
    def forward(self, data: Upload) -> Any:
        return data.bin


class Measure(TypedMsgPackMixin, Worker):
    def forward(self, data: List[bytes]) -> List[int]:
        return [len(buf) for buf in data]


if __name__ == "__main__":
    server = Server()
    server.append_worker(Validate)
    server.append_worker(Measure, max_batch_size=16)
    server.run()
