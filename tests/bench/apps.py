"""Benchmark workloads: one file of `Worker` classes, served by natserve or by Mosec.

``BENCH_FRAMEWORK`` (``natserve`` or ``mosec``) picks the import, ``BENCH_WORKLOAD`` the
pipeline; everything else is identical, down to the JSON at the edges (both frameworks'
default ``serialize`` differ: Mosec indents its JSON). Run as a normal app of either
framework: ``BENCH_WORKLOAD=batched python apps.py --port 8000``.

Every request is ``{"x": n, "y": 2n+1}`` and every response must be an object with the
same relation between ``x`` and ``y`` (echo returns its input; the others compute ``y``
from ``x``), which is what ``check.lua`` verifies for each response.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List

if os.environ.get("BENCH_FRAMEWORK") == "mosec":
    from mosec import Server, SSEWorker, Worker
else:
    from natserve import Server, SSEWorker, Worker

Item = Dict[str, Any]


class JsonEdges(Worker):  # type: ignore[misc]  # Mosec's Worker is untyped for mypy here
    """Compact JSON in and out, the same bytes under both frameworks."""

    def deserialize(self, data: bytes) -> Any:
        return json.loads(data)

    def serialize(self, data: Any) -> bytes:
        return json.dumps(data).encode()


class Echo(JsonEdges):
    """W1: returns its input."""

    def forward(self, data: Item) -> Item:
        return data


class Batched(JsonEdges):
    """W2: a model that takes 1 ms per batch, whatever its size."""

    def forward(self, data: List[Item]) -> List[Item]:
        time.sleep(0.001)
        return [{"x": d["x"], "y": 2 * d["x"] + 1} for d in data]


class Preprocess(JsonEdges):
    """W3, first stage: validates and keeps what the model needs."""

    def forward(self, data: Item) -> Item:
        return {"x": int(data["x"])}


class Inference(JsonEdges):
    """W3, second stage: 1 ms per batch of up to 8."""

    def forward(self, data: List[Item]) -> List[Item]:
        time.sleep(0.001)
        return [{"x": d["x"], "y": 2 * d["x"] + 1} for d in data]


class Slow(JsonEdges):
    """W4: 20 ms (BENCH_SLEEP_MS) per batch of up to 8, I/O-like (a remote model, a GPU
    kernel). W5 runs one agent at 20 ms beside one at 2 ms."""

    seconds = float(os.environ.get("BENCH_SLEEP_MS", "20")) / 1000

    def forward(self, data: List[Item]) -> List[Item]:
        time.sleep(self.seconds)
        return [{"x": d["x"], "y": 2 * d["x"] + 1} for d in data]


class Tokens(SSEWorker, JsonEdges):  # type: ignore[misc]
    """W6: streams EVENTS events 1 ms apart (a small model's tokens), then ends."""

    def forward(self, data: Item) -> Item:
        for n in range(EVENTS):
            self.send_stream_event(f'{{"token": {n}}}')
            time.sleep(0.001)
        return data


#: Events per W6 stream.
EVENTS = 8


def build(workload: str) -> Any:
    server = Server()
    if workload == "echo":
        server.append_worker(Echo, num=1, max_batch_size=1)
    elif workload == "batched":
        server.append_worker(Batched, num=1, max_batch_size=16, max_wait_time=10)
    elif workload == "pipeline":
        server.append_worker(Preprocess, num=2)
        server.append_worker(Inference, num=1, max_batch_size=8, max_wait_time=10)
    elif workload == "sse":
        server.append_worker(Tokens, num=1, max_batch_size=1)
    elif workload == "scaleout":
        server.append_worker(Slow, num=1, max_batch_size=8, max_wait_time=10)
    else:
        raise SystemExit(
            f"BENCH_WORKLOAD={workload!r}: expected echo, batched, pipeline, sse or scaleout"
        )
    return server


if __name__ == "__main__":
    build(os.environ.get("BENCH_WORKLOAD", "echo")).run()
