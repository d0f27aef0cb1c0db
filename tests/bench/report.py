"""What the bench measures and the table it prints: one `Run` per wrk (or floor, or SSE)
measurement, a `Row` per workload and concurrency, and the markdown table of their means
and natserve/Mosec ratios that `run.py` prints and writes into docs/benchmarks.md."""

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

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class Row:
    workload: str
    concurrency: int
    runs: List[Run] = field(default_factory=list)
    note: str = ""

    def of(self, framework: str) -> List[Run]:
        return [r for r in self.runs if r.framework == framework]


def mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def summary(row: Row) -> Dict[str, Any]:
    out: Dict[str, Any] = {"workload": row.workload, "concurrency": row.concurrency}
    for f in ("natserve", "mosec"):
        runs = row.of(f)
        out[f] = (
            {
                "rps": mean([r.rps for r in runs]),
                "p50_ms": mean([r.p50_ms for r in runs]),
                "p99_ms": mean([r.p99_ms for r in runs]),
                "errors": sum(r.errors for r in runs),
                "cpu_busy": mean([r.cpu_busy for r in runs]),
                "runs": [asdict(r) for r in runs],
            }
            if runs
            else None
        )
    n, m = out["natserve"], out["mosec"]
    out["rps_ratio"] = ratio(n and n["rps"], m and m["rps"])
    out["p50_ratio"] = ratio(n and n["p50_ms"], m and m["p50_ms"])
    out["p99_ratio"] = ratio(n and n["p99_ms"], m and m["p99_ms"])
    out["note"] = row.note
    return out


def table(summaries: List[Dict[str, Any]]) -> str:
    head = (
        "| workload | conc | natserve req/s | Mosec req/s | ratio | natserve p50 ms "
        "| Mosec p50 ms | ratio | natserve p99 ms | Mosec p99 ms | ratio | non-2xx n/M "
        "| CPU busy n/M | note |"
    )
    lines = [head, "|" + "---|" * 14]
    for s in summaries:
        n, m = s["natserve"] or {}, s["mosec"] or {}
        errors = f"{n.get('errors', '—')}/{m.get('errors', '—')}"
        cpu = "/".join(f"{d['cpu_busy']:.0%}" if d else "—" for d in (n, m))
        lines.append(
            f"| {s['workload']} | {s['concurrency']} | {fmt(n.get('rps'), ',.0f')} "
            f"| {fmt(m.get('rps'), ',.0f')} | {fmt(s['rps_ratio'], '.2f')} "
            f"| {fmt(n.get('p50_ms'), '.2f')} | {fmt(m.get('p50_ms'), '.2f')} "
            f"| {fmt(s['p50_ratio'], '.2f')} | {fmt(n.get('p99_ms'), '.2f')} "
            f"| {fmt(m.get('p99_ms'), '.2f')} | {fmt(s['p99_ratio'], '.2f')} "
            f"| {errors} | {cpu} | {s['note']} |"
        )
    return "\n".join(lines)
