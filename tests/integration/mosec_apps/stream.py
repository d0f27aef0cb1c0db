"""Mosec's SSE service (and examples/server_side_event): a worker that streams events."""

from typing import Any

from natserve import Server, SSEWorker
from natserve.errors import ValidationError


class Repeat(SSEWorker):
    def forward(self, data: Any) -> Any:
        text = data.get("text")
        if text is None:
            raise ValidationError("text is required")
        for _ in range(5):
            self.send_stream_event(text)
        return data


if __name__ == "__main__":
    server = Server()
    server.append_worker(Repeat)
    server.run()
