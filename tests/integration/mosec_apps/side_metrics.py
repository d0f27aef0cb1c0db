"""Mosec's examples/python_side_metrics.py: workers count results in Prometheus
multiprocess files; the launcher's main block serves them on a side port."""

import os
import tempfile
import threading
from typing import Any, Callable, Iterable, List
from wsgiref.simple_server import make_server

from natserve import Server, Worker
from natserve.errors import ValidationError

# Set before prometheus_client is imported; worker processes inherit the launcher's.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prom-")

from prometheus_client import (  # type: ignore[import-not-found,unused-ignore]
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)

registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
results = Counter("inference_result", "results by outcome", ("status", "pid"))


def metrics_app(environ: Any, start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = generate_latest(registry)
    start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
    return [body]


class AboveAverage(Worker):
    def deserialize(self, data: bytes) -> int:
        try:
            return int(super().deserialize(data)["num"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValidationError(f"num: {err}") from err

    def forward(self, data: List[int]) -> List[bool]:
        mean = sum(data) / len(data)
        above = [x >= mean for x in data]
        pid = str(os.getpid())
        results.labels(status="true", pid=pid).inc(sum(above))
        results.labels(status="false", pid=pid).inc(len(above) - sum(above))
        return above


if __name__ == "__main__":
    side = make_server("127.0.0.1", int(os.environ["SIDE_METRICS_PORT"]), metrics_app)
    threading.Thread(target=side.serve_forever, daemon=True).start()
    server = Server()
    server.append_worker(AboveAverage, max_batch_size=8)
    server.run()
