"""Mosec's examples/custom_env.py: one environment per worker process, read in __init__."""

import os
from typing import Any, Dict

from natserve import Server, Worker

DEVICES = 4


class PinnedModel(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.device = os.environ["CUDA_VISIBLE_DEVICES"]

    def forward(self, data: Any) -> Dict[str, Any]:
        return {"device": self.device, "worker_id": self.worker_id}


if __name__ == "__main__":
    server = Server()
    server.append_worker(
        PinnedModel,
        num=DEVICES,
        env=[{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(DEVICES)],
    )
    server.run()
