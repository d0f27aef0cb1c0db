"""Mosec's square service (tests/services/square_service.py), in natserve's words:
one batching stage whose missing key is a ValidationError."""

from typing import Any, Dict, List

from natserve import Server, Worker
from natserve.errors import ValidationError


class Square(Worker):
    def forward(self, batch: List[Dict[str, Any]]) -> List[Dict[str, int]]:
        try:
            return [{"x": int(item["x"]) ** 2} for item in batch]
        except KeyError as err:
            raise ValidationError(err) from err


if __name__ == "__main__":
    server = Server()
    server.append_worker(Square, max_batch_size=8)
    server.run()
