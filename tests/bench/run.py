"""natserve against Mosec, side by side, on loopback: the driver behind `make bench`.

Runs the workloads of ``apps.py`` under both frameworks (natserve from ``.venv``, Mosec
from ``.bench-venv``), loads each with wrk (``check.lua`` checks every response), runs
the bare JetStream floor (``scheduler/examples/floor.rs``) and natserve's scale-out
across agent processes, then prints one table and writes it as JSON
(``bench-results/bench.json``) and into ``docs/benchmarks.md`` between its markers.

Each workload starts both servers once, warms both up, then alternates natserve and
Mosec (A B A B) per concurrency, so drift on a noisy machine hits both alike. Exits 1 if
any response was not a 200 with the right body.

    .venv/bin/python tests/bench/run.py [--duration 10] [--only W1,W4] [--no-docs]

``--against-bin DIR`` replaces Mosec with natserve running the binaries in DIR (a copy of
an earlier ``natserve-ingress``/``natserve-agent``): the same alternation then measures an
optimisation against its baseline on the same noisy machine. ``--against-src CHECKOUT``
adds that checkout's Python package (its ``python-worker/`` first on ``PYTHONPATH``), so a
change on both sides of the worker socket is measured whole.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from report import Row, Run, summary, table

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
APPS = HERE / "apps.py"
LUA = HERE / "check.lua"
NATSERVE_PY = REPO / ".venv" / "bin" / "python"
MOSEC_PY = REPO / ".bench-venv" / "bin" / "python"
NATS_SERVER = REPO / ".venv" / "bin" / "nats-server"
FLOOR = REPO / "target" / "release" / "examples" / "floor"
RESULTS = REPO / "bench-results"
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
WRK_THREADS = 1
#: Events of each W6 stream (`apps.EVENTS`).
SSE_EVENTS = 8
REPS = 2
#: Set by --against-bin: the "mosec" side runs natserve with these binaries instead.
AGAINST_BIN: Optional[Path] = None
#: Set by --against-src: that checkout's Python package too, not only its binaries.
AGAINST_SRC: Optional[Path] = None
NATSERVE_ENV: Dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Procs:
    """Processes started for one workload; stopped (SIGTERM, then SIGKILL) in reverse."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: List[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: List[str], env: Optional[Dict[str, str]] = None) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        full_env = {**os.environ, **(env or {})}
        self.procs.append(
            subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                start_new_session=True,
            )
        )  # fmt: skip

    def stop(self, proc: Optional[subprocess.Popen[bytes]] = None) -> None:
        for p in [proc] if proc else list(reversed(self.procs)):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(40)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            self.procs.remove(p)


@contextmanager
def processes(logs: Path) -> Iterator[Procs]:
    procs = Procs(logs)
    try:
        yield procs
    finally:
        procs.stop()


def post(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=b'{"x": 1, "y": 3}', method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_serving(base: str, timeout: float = 90.0) -> None:
    """Until a real request gets a right answer (readiness endpoints differ)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = post(base + "/inference")
            if last[0] == 200 and b'"y": 3' in last[1]:
                return
        except OSError as err:
            last = err
        time.sleep(0.2)
    raise TimeoutError(f"{base} never served: {last}")


def app_env(framework: str, workload: str) -> Dict[str, str]:
    return {"BENCH_FRAMEWORK": framework, "BENCH_WORKLOAD": workload, "PYTHONUNBUFFERED": "1"}


def start_app(procs: Procs, framework: str, workload: str, *flags: str) -> str:
    port = free_port()
    env = app_env(framework, workload)
    python = NATSERVE_PY if framework == "natserve" else MOSEC_PY
    if framework == "natserve":
        env.update(NATSERVE_ENV)
    if framework == "mosec" and AGAINST_BIN is not None:
        python = NATSERVE_PY
        env.update(BENCH_FRAMEWORK="natserve", NATSERVE_BIN_DIR=str(AGAINST_BIN))
        if AGAINST_SRC is not None:
            env["PYTHONPATH"] = str(AGAINST_SRC / "python-worker")
    args = [str(python), str(APPS), "--port", str(port), "--address", "127.0.0.1", *flags]
    procs.start(f"{workload}-{framework}", args, env)
    return f"http://127.0.0.1:{port}"


def wrk(framework: str, base: str, concurrency: int, seconds: float) -> Run:
    busy0, total0 = cpu_ticks()
    out = subprocess.run(
        [
            "wrk", f"-t{min(WRK_THREADS, concurrency)}", f"-c{concurrency}", f"-d{seconds:g}s",
            "--timeout", "10s", "-s", str(LUA), base + "/inference",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    busy1, total1 = cpu_ticks()
    return parse_run(framework, out, (busy1 - busy0) / max(1, total1 - total0))


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
    )


def alternate(
    rows: List[Row],
    bases: Dict[str, str],
    measure: Callable[[str, str, int, float], Run],
    seconds: float,
    warm_up: float,
) -> None:
    """Warms every framework up at the highest concurrency (not recorded), then measures
    each row REPS times, the frameworks alternating, so drift hits them alike; the order
    flips every round (A B, B A), because going first is not neutral: the same build
    measured first read 0.77-0.86x of itself measured second on a loaded machine."""
    for f, base in bases.items():
        measure(f, base, max(row.concurrency for row in rows), warm_up)
    for row in rows:
        for rep in range(REPS):
            order = list(bases.items())
            for f, base in order if rep % 2 == 0 else reversed(order):
                run = measure(f, base, row.concurrency, seconds)
                row.runs.append(run)
                log_run(row, run)


def side_by_side(
    name: str, workload: str, concurrencies: List[int], seconds: float, logs: Path
) -> List[Row]:
    rows = [Row(name, c) for c in concurrencies]
    with processes(logs) as procs:
        bases = {f: start_app(procs, f, workload) for f in ("natserve", "mosec")}
        for base in bases.values():
            wait_serving(base)
        alternate(rows, bases, wrk, seconds, warm_up=min(3.0, seconds))
    return rows


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


def sse_clients(framework: str, base: str, concurrency: int, seconds: float) -> Run:
    """``concurrency`` clients streaming one request after another for ``seconds``; p50 and
    p99 are of the time to the first event, errors count streams without all events."""
    firsts: List[float] = []
    errors = [0]
    stop = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop:
            try:
                first, _, events = sse_once(base)
            except OSError:
                errors[0] += 1
                continue
            if events != SSE_EVENTS:
                errors[0] += 1
            else:
                firsts.append(first)

    busy0, total0 = cpu_ticks()
    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - started
    busy1, total1 = cpu_ticks()
    firsts.sort()
    pick = lambda q: firsts[min(len(firsts) - 1, int(q * len(firsts)))] * 1e3 if firsts else 0.0  # noqa: E731
    return Run(
        framework=framework,
        requests=len(firsts),
        seconds=took,
        p50_ms=pick(0.5),
        p99_ms=pick(0.99),
        errors=errors[0],
        cpu_busy=(busy1 - busy0) / max(1, total1 - total0),
    )


def wait_streaming(base: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = sse_once(base)
            if last[2] == SSE_EVENTS:
                return
        except OSError as err:
            last = err
        time.sleep(0.2)
    raise TimeoutError(f"{base} never streamed: {last}")


def time_to_first_event(concurrencies: List[int], seconds: float, logs: Path) -> List[Row]:
    """W6: the same SSEWorker under both frameworks; p50/p99 are time to first event."""
    rows = [Row("W6 SSE time to first event", c) for c in concurrencies]
    for row in rows:
        row.note = f"p50/p99: time to the first of {SSE_EVENTS} events (1 ms apart)"
    with processes(logs) as procs:
        bases = {f: start_app(procs, f, "sse") for f in ("natserve", "mosec")}
        for base in bases.values():
            wait_streaming(base)
        alternate(rows, bases, sse_clients, seconds, warm_up=min(2.0, seconds))
    return rows


def log_run(row: Row, run: Run) -> None:
    print(
        f"  {row.workload} c={row.concurrency} {run.framework:8} {run.rps:8.0f} req/s  "
        f"p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  errors {run.errors}  "
        f"cpu {run.cpu_busy:.0%}",
        flush=True,
    )


def nats_server(procs: Procs, tmp: Path) -> str:
    """Starts a nats-server with JetStream on a free loopback port; its URL."""
    port = free_port()
    conf = tmp / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp / "js"}" }}\n')
    procs.start("nats-server", [str(NATS_SERVER), "-c", str(conf)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    return f"nats://127.0.0.1:{port}"


def floor(concurrencies: List[int], seconds: float, logs: Path) -> List[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, processes(logs) as procs:
        url = nats_server(procs, Path(tmp))
        for c in concurrencies:
            row = Row("floor: JetStream publish-pull-reply-ack", c)
            busy0, total0 = cpu_ticks()
            out = subprocess.run(
                [str(FLOOR), "--nats", url, "--concurrency", str(c),
                 "--duration-s", f"{seconds:g}", "--warmup-s", "2"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            busy1, total1 = cpu_ticks()
            run = parse_run("natserve", out, (busy1 - busy0) / max(1, total1 - total0))
            row.runs.append(run)
            log_run(row, run)
            rows.append(row)
    return rows


def stage_workers(base: str) -> int:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(r"^natserve_stage_workers\{[^}]*\} (\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


def scale_out(agent_counts: List[int], concurrency: int, seconds: float, logs: Path) -> List[Row]:
    """One ingress, then 1, 2, 4 agents as separate processes, all sharing one nats-server."""
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as tmp, processes(logs) as procs:
        url = nats_server(procs, Path(tmp))
        env = {**app_env("natserve", "scaleout"), **NATSERVE_ENV}
        port = free_port()
        procs.start(
            "scaleout-ingress",
            [str(NATSERVE_PY), str(APPS), "--role", "ingress", "--nats", url,
             "--port", str(port), "--address", "127.0.0.1"],
            env,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        agents = 0
        for target in agent_counts:
            while agents < target:
                agents += 1
                procs.start(
                    f"scaleout-agent-{agents}",
                    [str(NATSERVE_PY), str(APPS), "--role", "agent", "--nats", url],
                    env,
                )
            wait_serving(base)
            deadline = time.monotonic() + 60
            while stage_workers(base) < agents and time.monotonic() < deadline:
                time.sleep(0.2)
            wrk("natserve", base, concurrency, min(3.0, seconds))  # warm-up
            row = Row(f"W4 scale-out, {agents} agent{'s' if agents > 1 else ''}", concurrency)
            run = wrk("natserve", base, concurrency, seconds)
            row.runs.append(run)
            log_run(row, run)
            rows.append(row)
    base_rps = rows[0].runs[0].rps if rows else 0.0
    for row in rows:
        row.note = f"{row.runs[0].rps / base_rps:.2f}x one agent" if base_rps else ""
    return rows


def uneven(concurrency: int, seconds: float, logs: Path) -> List[Row]:
    """A slow agent (20 ms per batch of 8) beside a fast one (2 ms), with the agents'
    prefetch off (pull only for idle workers), on (one batch ahead per worker) and auto
    (the default: ahead only where batches are short next to a pull)."""
    rows: List[Row] = []
    for prefetch in ("off", "on", "auto"):
        with tempfile.TemporaryDirectory() as tmp, processes(logs) as procs:
            url = nats_server(procs, Path(tmp))
            env = {**app_env("natserve", "scaleout"), **NATSERVE_ENV}
            env["NATSERVE_PREFETCH"] = prefetch
            port = free_port()
            procs.start(
                f"uneven-ingress-{prefetch}",
                [str(NATSERVE_PY), str(APPS), "--role", "ingress", "--nats", url,
                 "--port", str(port), "--address", "127.0.0.1"],
                env,
            )  # fmt: skip
            for name, ms in (("slow", "20"), ("fast", "2")):
                procs.start(
                    f"uneven-{name}-{prefetch}",
                    [str(NATSERVE_PY), str(APPS), "--role", "agent", "--nats", url],
                    {**env, "BENCH_SLEEP_MS": ms},
                )
            base = f"http://127.0.0.1:{port}"
            wait_serving(base)
            deadline = time.monotonic() + 60
            while stage_workers(base) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            wrk("natserve", base, concurrency, min(3.0, seconds))  # warm-up
            row = Row(f"W5 uneven agents (20 + 2 ms/batch), prefetch {prefetch}", concurrency)
            run = wrk("natserve", base, concurrency, seconds)
            row.runs.append(run)
            log_run(row, run)
            rows.append(row)
    return rows


def machine() -> Dict[str, str]:
    cpu = next(
        (x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
         if x.startswith("model name")), platform.processor(),
    )  # fmt: skip
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    wrk_version = wrk_version.split("\n")[0]
    mosec = subprocess.run(
        [str(MOSEC_PY), "-c", "import importlib.metadata as m; print(m.version('mosec'))"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{mem_kb / 1024 / 1024:.0f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "load generator": f"{wrk_version.strip()}, -t{WRK_THREADS}, keep-alive, check.lua",
        "mosec": mosec,
        "natserve commit": commit,
    }


def write_docs(md: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    DOCS.write_text(f"{before}{BEGIN}\n{md}\n{END}{after}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--only", default="floor,W1,W2,W3,W4,W5,W6", help="comma-separated subset")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/benchmarks.md alone")
    parser.add_argument(
        "--against-bin", type=Path, help="compare with natserve binaries in this directory"
    )
    parser.add_argument(
        "--against-src",
        type=Path,
        help="with --against-bin: also run the Python package of this natserve checkout",
    )
    parser.add_argument(
        "--natserve-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for natserve's processes, e.g. NATSERVE_PREFETCH=1 (repeatable)",
    )
    args = parser.parse_args()
    for item in args.natserve_env:
        name, _, value = item.partition("=")
        NATSERVE_ENV[name] = value
    if args.against_bin:
        global AGAINST_BIN
        AGAINST_BIN = args.against_bin.resolve()
        args.no_docs = True
        print(f"the Mosec columns are natserve with the binaries in {AGAINST_BIN}")
    if args.against_src:
        global AGAINST_SRC
        AGAINST_SRC = args.against_src.resolve()
        print(f"... and the Python package of {AGAINST_SRC}")
    only = set(args.only.split(","))
    for need in (NATSERVE_PY, MOSEC_PY, NATS_SERVER) + ((FLOOR,) if "floor" in only else ()):
        if not need.exists():
            print(f"missing {need}: run `make bench`, which installs everything", file=sys.stderr)
            return 2
    if shutil.which("wrk") is None:
        print("wrk not found: run `make bench` (apt-get install wrk)", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    logs = RESULTS / "logs"
    logs.mkdir(exist_ok=True)
    d = args.duration
    started = time.monotonic()
    rows: List[Row] = []
    if "floor" in only:
        print("floor: bare JetStream round trip", flush=True)
        rows += floor([1, 32], d, logs)
    if "W1" in only:
        print("W1 echo", flush=True)
        rows += side_by_side("W1 echo", "echo", [1, 32], d, logs)
    if "W2" in only:
        print("W2 batched (1 ms/batch, max 16, wait 10 ms)", flush=True)
        rows += side_by_side("W2 batched", "batched", [32, 128], d, logs)
    if "W3" in only:
        print("W3 pipeline (2 x preprocess -> batch of 8)", flush=True)
        rows += side_by_side("W3 pipeline", "pipeline", [64], d, logs)
    if "W4" in only:
        print("W4 scale-out (20 ms/batch of 8; 1, 2, 4 agents)", flush=True)
        rows += scale_out([1, 2, 4], 128, d, logs)
    if "W5" in only:
        print("W5 uneven agents (20 and 2 ms per batch of 8; prefetch off, on, auto)", flush=True)
        rows += uneven(32, d, logs)
    if "W6" in only:
        print("W6 SSE time to first event (8 events, 1 ms apart)", flush=True)
        rows += time_to_first_event([1, 8], d, logs)

    summaries = [summary(r) for r in rows]
    md_table = table(summaries)
    info = machine()
    command = "make bench" + (f"  # run.py {' '.join(sys.argv[1:])}" if sys.argv[1:] else "")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = {"date": when, "command": command, "machine": info, "rows": summaries}
    (RESULTS / "bench.json").write_text(json.dumps(report, indent=2))
    print()
    print(md_table)
    print(f"\n{time.monotonic() - started:.0f} s; JSON in {RESULTS / 'bench.json'}")
    if not args.no_docs:
        md = "\n".join(
            [f"Run {when} with `{command}` ({d:g} s per measurement, "
             f"{REPS} alternating runs per framework, means shown).", ""]
            + [f"- {k}: {v}" for k, v in info.items()]
            + ["", md_table]
        )  # fmt: skip
        write_docs(md)
    errors = sum((s[f] or {}).get("errors", 0) for s in summaries for f in ("natserve", "mosec"))
    if errors:
        print(f"{errors} responses were not a 200 with the right body", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
