"""The bench's workloads as a LitServe server (run with ``.bench-litserve``'s Python).

The worker logic is ``apps.py``'s: echo for W1, 1 ms per batch of up to 16 (10 ms
wait) for W2, the 1 ms a blocking sleep in the inference process. LitServe has one
``LitAPI`` per route and no multi-stage pipeline, so there is no W3 here. W6 is a
streaming ``LitAPI`` (``stream=True``): ``predict`` yields ``apps.py``'s 8 tokens 1 ms
apart, ``encode_response`` turns each into an SSE event (``data: {"token": n}``), and a
small ASGI middleware labels the stream ``text/event-stream`` (LitServe's own streaming
response has no content type; only its OpenAI spec sets one).

One inference worker (``workers_per_device=1``, as the other servers have for these
workloads), one API server per core (LitServe's default is one per worker; its HTTP
front is Python, where natserve's and Mosec's are multi-threaded Rust, and two served
W1 and W2 faster than one here), ZeroMQ between them (``fast_queue``, LitServe's advice
above 100 requests/s), logging at warning and no access log. ``BENCH_WORKLOAD`` picks
the workload.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Awaitable, Callable, Dict, Iterator, List, MutableMapping

import litserve as ls

Item = Dict[str, Any]
#: Events per W6 stream (``apps.EVENTS``; ``apps.py`` itself imports natserve or Mosec).
EVENTS = 8
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


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


class Tokens(ls.LitAPI):  # type: ignore[misc]
    """W6: streams EVENTS events 1 ms apart (a small model's tokens), then ends."""

    def setup(self, device: str) -> None:
        pass

    def predict(self, x: Item) -> Iterator[Item]:
        # LitServe sends each event on as encode_response yields it, before the next 1 ms.
        for n in range(EVENTS):
            yield {"token": n}
            time.sleep(0.001)

    def encode_response(self, output: Iterator[Item]) -> Iterator[str]:
        for item in output:
            yield f"data: {json.dumps(item)}\n\n"


class EventStream:
    """Pure ASGI: labels the responses that have no content type (LitServe's stream;
    its errors are JSON) ``text/event-stream``. Only W6 installs it."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def labelled(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if all(k.lower() != b"content-type" for k, _ in headers):
                    message["headers"] = [*headers, (b"content-type", b"text/event-stream")]
            await send(message)

        return await self.app(scope, receive, labelled)


def build(workload: str) -> Any:
    if workload == "echo":
        return Echo(max_batch_size=1, api_path="/inference")
    if workload == "batched":
        return Batched(max_batch_size=16, batch_timeout=0.01, api_path="/inference")
    if workload == "sse":
        return Tokens(max_batch_size=1, stream=True, api_path="/inference")
    raise SystemExit(f"BENCH_WORKLOAD={workload!r}: LitServe has echo, batched and sse")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    args = parser.parse_args()
    workload = os.environ.get("BENCH_WORKLOAD", "echo")
    api = build(workload)
    server = ls.LitServer(
        api,
        accelerator="cpu",
        workers_per_device=1,
        fast_queue=True,
        middlewares=[EventStream] if workload == "sse" else None,
    )
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
