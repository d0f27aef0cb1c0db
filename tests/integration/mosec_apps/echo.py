"""Mosec's examples/echo.py, in natserve's words: three stages, the middle one batching,
each with a warm-up example in Mosec's call shape (the batching stage's is a list)."""

import time
from typing import Any, Dict, List

from natserve import Server, ValidationError, Worker, get_logger

logger = get_logger()


class Preprocess(Worker):
    example = {"time": 0}

    def forward(self, data: Dict[str, Any]) -> float:
        try:
            return float(data["time"])
        except KeyError as err:
            raise ValidationError(f"cannot find key {err}") from err


class Inference(Worker):
    example = [0, 1e-5, 2e-4]

    def forward(self, data: List[float]) -> List[float]:
        time.sleep(max(data))
        return data


class Postprocess(Worker):
    def forward(self, data: float) -> Dict[str, str]:
        return {"msg": f"sleep {data} seconds"}


if __name__ == "__main__":
    server = Server()
    server.append_worker(Preprocess)
    server.append_worker(Inference, max_batch_size=32)
    server.append_worker(Postprocess)
    server.run()
