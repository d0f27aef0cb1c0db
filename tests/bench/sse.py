"""W6's client: streamed requests, timed to their first event, over the same
``/inference`` as wrk loads; a stream counts only with all of its events."""

from __future__ import annotations

import http.client
import subprocess
import threading
import time
from typing import List, Optional

from procs import Side, broker_count, cpu_ticks
from report import Run

#: Events of each W6 stream (`apps.EVENTS`).
SSE_EVENTS = 8


def sse_once(base: str) -> tuple[float, float, int]:
    """One streamed request: seconds to its first event, to its end, and its events."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        started = time.perf_counter()
        conn.request("POST", "/inference", body=b'{"x": 1, "y": 3}')
        resp = conn.getresponse()
        first, events = 0.0, 0
        for line in resp:
            if line.startswith(b"data:"):
                events += 1
                first = first or time.perf_counter() - started
            elif line.startswith(b"event: error"):
                return first, time.perf_counter() - started, -1
        return first, time.perf_counter() - started, events
    finally:
        conn.close()


def sse_clients(side: Side, concurrency: int, seconds: float) -> Run:
    """``concurrency`` clients streaming one request after another for ``seconds``; p50 and
    p99 are of the time to the first event, errors count streams without all events."""
    firsts: List[float] = []
    errors = [0]
    stop = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop:
            try:
                first, _, events = sse_once(side.base)
            except OSError:
                errors[0] += 1
                continue
            if events != SSE_EVENTS:
                errors[0] += 1
            else:
                firsts.append(first)

    busy0, total0 = cpu_ticks()
    before = broker_count(side)
    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - started
    busy1, total1 = cpu_ticks()
    after = broker_count(side)
    firsts.sort()
    pick = lambda q: firsts[min(len(firsts) - 1, int(q * len(firsts)))] * 1e3 if firsts else 0.0  # noqa: E731
    return Run(
        framework=side.key,
        requests=len(firsts),
        seconds=took,
        p50_ms=pick(0.5),
        p99_ms=pick(0.99),
        errors=errors[0],
        cpu_busy=(busy1 - busy0) / max(1, total1 - total0),
        broker_msgs=after - before if before is not None and after is not None else None,
    )


def wait_streaming(
    base: str, timeout: float = 90.0, proc: Optional[subprocess.Popen[bytes]] = None
) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}")
        try:
            last = sse_once(base)
            if last[2] == SSE_EVENTS:
                return
        except OSError as err:
            last = err
        time.sleep(0.2)
    raise TimeoutError(f"{base} never streamed: {last}")
