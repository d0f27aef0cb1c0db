"""Mosec's SSE service (tests/services/sse_service.py): a plain stage, then a batched
SSEWorker that streams each item's text five times."""

from typing import Any, List

from natserve import Server, SSEWorker, Worker, get_logger
from natserve.errors import ValidationError

logger = get_logger()
EPOCH = 5


class Preprocess(Worker):
    def forward(self, data: Any) -> Any:
        text = data.get("text")
        if text is None:
            raise ValidationError("text is required")
        return text


class Inference(SSEWorker):
    def forward(self, data: List[Any]) -> List[Any]:
        for _ in range(EPOCH):
            for j in range(len(data)):
                self.send_stream_event(f"{data[j]}", index=j)
        # this return value will be ignored
        return data


if __name__ == "__main__":
    server = Server()
    server.append_worker(Preprocess)
    server.append_worker(Inference, max_batch_size=2)
    server.run()
