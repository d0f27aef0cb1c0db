"""The pipeline natserve's image serves by default (`/app/app.py`), and a template for yours.

It is `examples/pipeline.py` plus GPU pinning: `Preprocess` (CPU, 2 processes) validates
``{"x": number}``; `Inference` (batched) answers ``{"x": x, "y": 2 * x, "batch": n}``.
`Inference` runs one process per GPU, each seeing only its own device through
``CUDA_VISIBLE_DEVICES``: ``NUM_GPUS`` sets how many (the compose file's `gpu` profile
sets it), else the NVIDIA devices visible in the container are counted; with no GPU it
runs 2 CPU processes.

The compose services pick the role and the NATS server with ``NATSERVE_ROLE`` and
``NATSERVE_NATS``; without them this runs everything, a nats-server included, so
``docker run -p 8000:8000 natserve`` works alone too.
"""

from __future__ import annotations

import glob
import os
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
    """A stand-in model: doubles each value of the batch. Load a real one in __init__."""

    example = 1.0

    def __init__(self) -> None:
        super().__init__()
        logger.info(
            "inference worker %d loading (CUDA_VISIBLE_DEVICES=%s)",
            self.worker_id,
            os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
        )

    def forward(self, batch: list[float]) -> list[dict[str, Any]]:
        return [{"x": v, "y": v * 2, "batch": len(batch)} for v in batch]


def gpu_count() -> int:
    """``NUM_GPUS`` when set, else the NVIDIA devices the container runtime mapped in."""
    raw = os.environ.get("NUM_GPUS", "").strip()
    if raw:
        if not raw.isdigit():
            raise SystemExit(f"NUM_GPUS: invalid value {raw!r}: expected a number of GPUs")
        return int(raw)
    return len(glob.glob("/dev/nvidia[0-9]*"))


def build_server(gpus: int) -> Server:
    server = Server()
    server.append_worker(Preprocess, num=2)
    if gpus:
        # One process per GPU, each seeing only its own device.
        server.append_worker(
            Inference,
            num=gpus,
            max_batch_size=8,
            max_wait_time=10,
            env=[{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(gpus)],
        )
    else:
        server.append_worker(Inference, num=2, max_batch_size=8, max_wait_time=10)
    return server


if __name__ == "__main__":
    build_server(gpu_count()).run()
