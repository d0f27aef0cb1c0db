"""Example: a two-stage pipeline with dynamic batching in the second stage.

``Preprocess`` (2 processes) validates ``{"x": number}`` and hands a float on;
``Inference`` gets up to 8 of them at once (waiting at most 10 ms for a batch to fill)
and answers ``{"x": x, "y": 2 * x, "batch": <size of the batch it ran in>}`` for each, so
every response can be matched to its own request.

    python examples/pipeline.py
    curl -X POST localhost:8000/inference -d '{"x": 3}'   # {"x": 3.0, "y": 6.0, "batch": 1}
"""

from __future__ import annotations

from typing import Any

from natserve import Server, Worker, get_logger
from natserve.errors import ValidationError

logger = get_logger()


class Preprocess(Worker):
    """Turns the request into the float the model takes."""

    def forward(self, req: dict[str, Any]) -> float:
        try:
            return float(req["x"])
        except KeyError as err:
            raise ValidationError("cannot find key 'x'") from err
        except (TypeError, ValueError) as err:
            raise ValidationError("cannot convert 'x' value to float") from err


class Inference(Worker):
    """A stand-in model: doubles each value of the batch."""

    example = 1.0

    def __init__(self) -> None:
        super().__init__()
        logger.info(
            "inference worker %d of stage %d loading", self.worker_id, self.stage
        )

    def forward(self, batch: list[float]) -> list[dict[str, Any]]:
        return [{"x": v, "y": v * 2, "batch": len(batch)} for v in batch]


if __name__ == "__main__":
    server = Server()
    server.append_worker(Preprocess, num=2)
    server.append_worker(Inference, max_batch_size=8, max_wait_time=10)
    server.run()
