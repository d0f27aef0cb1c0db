"""What the bench measures and the table it prints: one `Run` per wrk (or floor, or SSE)
measurement, a `Row` per workload and concurrency, and the markdown table of their means,
one line per server, with natserve/server ratios, that `run.py` prints and writes into
docs/benchmarks.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class Run:
    """One wrk (or floor) measurement."""

    framework: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_busy: float  # share of all cores busy during the run, 0..1
    #: nats-server's in_msgs + out_msgs over the run (``/varz``); None without a broker.
    broker_msgs: Optional[int] = None
    #: The slowest request (wrk's max), in the log line: a stall shows there first.
    max_ms: Optional[float] = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class Row:
    workload: str
    concurrency: int
    runs: List[Run] = field(default_factory=list)
    note: str = ""
    #: Servers with no numbers in this row, and why (no form of the workload, no start).
    missing: Dict[str, str] = field(default_factory=dict)

    def of(self, framework: str) -> List[Run]:
        return [r for r in self.runs if r.framework == framework]


def mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def stats(runs: List[Run]) -> Dict[str, Any]:
    msgs = [r.broker_msgs for r in runs if r.broker_msgs is not None]
    requests = sum(r.requests for r in runs if r.broker_msgs is not None)
    return {
        "rps": mean([r.rps for r in runs]),
        "p50_ms": mean([r.p50_ms for r in runs]),
        "p99_ms": mean([r.p99_ms for r in runs]),
        "errors": sum(r.errors for r in runs),
        "cpu_busy": mean([r.cpu_busy for r in runs]),
        "msgs_per_request": sum(msgs) / requests if msgs and requests else None,
        "runs": [asdict(r) for r in runs],
    }


def summary(row: Row, frameworks: List[str]) -> Dict[str, Any]:
    """Means per server in ``frameworks`` order (natserve first), each with natserve's
    value divided by its own."""
    servers: Dict[str, Any] = {}
    for f in frameworks:
        runs = row.of(f)
        if runs:
            servers[f] = stats(runs)
        elif f in row.missing:
            servers[f] = {"missing": row.missing[f]}
    n = servers.get("natserve") or {}
    for f, s in servers.items():
        if f != "natserve" and "rps" in s:
            s["rps_ratio"] = ratio(n.get("rps"), s["rps"])
            s["p50_ratio"] = ratio(n.get("p50_ms"), s["p50_ms"])
            s["p99_ratio"] = ratio(n.get("p99_ms"), s["p99_ms"])
    return {
        "workload": row.workload,
        "concurrency": row.concurrency,
        "servers": servers,
        "note": row.note,
    }


HEAD = (
    "| workload | conc | server | req/s | p50 ms | p99 ms | ratio req/s | ratio p50 "
    "| ratio p99 | non-2xx | CPU busy | msgs/req | note |"
)


def table(summaries: List[Dict[str, Any]], titles: Dict[str, str]) -> str:
    """One line per server and row; ratios are natserve's value over that server's;
    msgs/req is broker messages per request, ``-`` for a server without a broker."""
    lines = [HEAD, "|" + "---|" * 13]
    for s in summaries:
        for f, d in s["servers"].items():
            title = titles.get(f, f)
            head = f"| {s['workload']} | {s['concurrency']} | {title} "
            if "missing" in d:
                why = d["missing"].replace("|", "/")
                lines.append(head + "| — " * 8 + f"| - | {why} |")
                continue
            msgs = "-" if d["msgs_per_request"] is None else f"{d['msgs_per_request']:.1f}"
            lines.append(
                head + f"| {fmt(d['rps'], ',.0f')} | {fmt(d['p50_ms'], '.2f')} "
                f"| {fmt(d['p99_ms'], '.2f')} | {fmt(d.get('rps_ratio'), '.2f')} "
                f"| {fmt(d.get('p50_ratio'), '.2f')} | {fmt(d.get('p99_ratio'), '.2f')} "
                f"| {d['errors']} | {d['cpu_busy']:.0%} | {msgs} "
                f"| {s['note'] if f == 'natserve' else ''} |"
            )
    return "\n".join(lines)
