"""The bench's workloads as a LitServe server (run with ``.bench-litserve``'s Python).

The worker logic is ``apps.py``'s: echo for W1, 1 ms per batch of up to 16 (10 ms
wait) for W2, the 1 ms a blocking sleep in the inference process. LitServe has one
``LitAPI`` per route and no multi-stage pipeline, so there is no W3 here.

One inference worker (``workers_per_device=1``, as the other servers have for these
workloads), one API server per core (LitServe's default is one per worker; its HTTP
front is Python, where natserve's and Mosec's are multi-threaded Rust, and two served
W1 and W2 faster than one here), ZeroMQ between them (``fast_queue``, LitServe's advice
above 100 requests/s), logging at warning and no access log. ``BENCH_WORKLOAD`` picks
the workload.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List

import litserve as ls

Item = Dict[str, Any]


class Echo(ls.LitAPI):  # type: ignore[misc]
    """W1: returns its input."""

    def setup(self, device: str) -> None:
        pass

    def predict(self, x: Item) -> Item:
        return x


class Batched(ls.LitAPI):  # type: ignore[misc]
    """W2: a model that takes 1 ms per batch, whatever its size."""

    def setup(self, device: str) -> None:
        pass

    def predict(self, data: List[Item]) -> List[Item]:
        time.sleep(0.001)
        return [{"x": d["x"], "y": 2 * d["x"] + 1} for d in data]


def build(workload: str) -> Any:
    if workload == "echo":
        return Echo(max_batch_size=1, api_path="/inference")
    if workload == "batched":
        return Batched(max_batch_size=16, batch_timeout=0.01, api_path="/inference")
    raise SystemExit(f"BENCH_WORKLOAD={workload!r}: LitServe has echo and batched")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    args = parser.parse_args()
    api = build(os.environ.get("BENCH_WORKLOAD", "echo"))
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True)
    server.run(
        host=args.address,
        port=args.port,
        log_level="warning",
        generate_client_file=False,
        num_api_servers=os.cpu_count() or 1,
        access_log=False,
    )


if __name__ == "__main__":
    main()
