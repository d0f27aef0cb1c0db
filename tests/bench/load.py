"""The load and what it cost: wrk against one server (``check.lua`` checks every
response), the CPU the machine spent meanwhile, the broker messages it took (nats-server's
``/varz``), and the line each measurement prints."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

from procs import Side, broker_count, cpu_ticks
from report import Row, Run

LUA = Path(__file__).resolve().parent / "check.lua"
WRK_THREADS = 1


def measured(side: Side, run: Callable[[], Run]) -> Run:
    """``run()`` with the broker messages it cost (``/varz`` before and after)."""
    before = broker_count(side)
    result = run()
    after = broker_count(side)
    if before is not None and after is not None:
        result.broker_msgs = after - before
    return result


def wrk(side: Side, concurrency: int, seconds: float) -> Run:
    def once() -> Run:
        busy0, total0 = cpu_ticks()
        out = subprocess.run(
            [
                "wrk", f"-t{min(WRK_THREADS, concurrency)}", f"-c{concurrency}",
                f"-d{seconds:g}s", "--timeout", "10s", "-s", str(LUA), side.base + "/inference",
            ],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        busy1, total1 = cpu_ticks()
        return parse_run(side.key, out, (busy1 - busy0) / max(1, total1 - total0))

    return measured(side, once)


def parse_run(framework: str, out: str, cpu_busy: float) -> Run:
    line = next((x for x in out.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"no BENCH_JSON line in:\n{out}")
    d = json.loads(line[len("BENCH_JSON ") :])
    return Run(
        framework=framework,
        requests=d["requests"],
        seconds=d["duration_us"] / 1e6,
        p50_ms=d["p50_us"] / 1e3,
        p99_ms=d["p99_us"] / 1e3,
        errors=d["non_2xx"] + d["bad_body"] + d["socket_errors"],
        cpu_busy=cpu_busy,
        max_ms=d["max_us"] / 1e3,
    )


def log_run(row: Row, run: Run) -> None:
    print(
        f"  {row.workload} c={row.concurrency} {run.framework:8} {run.rps:8.0f} req/s  "
        f"p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms"
        + ("" if run.max_ms is None else f"  max {run.max_ms:7.1f} ms")
        + f"  errors {run.errors}  cpu {run.cpu_busy:.0%}"
        + (
            ""
            if run.broker_msgs is None
            else f"  msgs/req {run.broker_msgs / max(1, run.requests):.1f}"
        ),
        flush=True,
    )
