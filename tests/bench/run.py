"""natserve against its peers, side by side, on loopback: the driver behind `make bench`.

Runs the workloads of ``apps.py`` under natserve (from ``.venv``) and its peers (``--peers``:
Mosec, Ray Serve, LitServe, each in its own virtualenv, see ``peers.py``), loads each with
wrk (``check.lua`` checks every response), runs the bare JetStream floor
(``scheduler/examples/floor.rs``) and natserve's scale-out across agent processes, then
prints one table and writes it as JSON (``bench-results/bench.json``) and into
``docs/benchmarks.md`` between its markers.

Each workload starts every server once, warms each up, then alternates them per
concurrency, the order flipping every round, so drift on a noisy machine hits all alike.
natserve runs against a nats-server the bench starts with monitoring on: its ``/varz``
before and after each run gives the broker messages per request. Exits 1 if any response
of natserve or Mosec was not a 200 with the right body (a peer's are only reported).

    .venv/bin/python tests/bench/run.py [--duration 10] [--only W1,W4] [--peers mosec] [--no-docs]

``--against-bin DIR`` replaces Mosec with natserve running the binaries in DIR (a copy of
an earlier ``natserve-ingress``/``natserve-agent``): the same alternation then measures an
optimisation against its baseline on the same noisy machine. ``--against-src CHECKOUT``
adds that checkout's Python package (its ``python-worker/`` first on ``PYTHONPATH``), so a
change on both sides of the worker socket is measured whole.

``net`` takes W2 (one agent, concurrency 32 and 128) and W4 (one agent, then two) off
loopback: nats-server, the ingress and each agent run in network namespaces of their own,
on one bridge, with ``tc netem`` adding 0.25 ms to each end of every veth, and wrk loads
the ingress from the root namespace (``netns.py`` builds and removes it all). It shows
what a real hop between hosts costs the batched path, and whether scale-out stays linear
across one. Without root or iproute2 its rows say why; a kernel without ``sch_netem``
still gets the namespaces, and the rows say the delay is missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional

import netns
import peers
from load import WRK_THREADS, log_run, measured, parse_run, wrk
from procs import (
    NATS_SERVER,
    REPO,
    Procs,
    Side,
    cpu_ticks,
    free_port,
    nats_server,
    processes,
    wait_serving,
)
from report import Row, Run, summary, table
from sse import SSE_EVENTS, sse_clients, wait_streaming

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps.py"
NATSERVE_PY = REPO / ".venv" / "bin" / "python"
FLOOR = REPO / "target" / "release" / "examples" / "floor"
RESULTS = REPO / "bench-results"
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
REPS = 2
#: Set by --against-bin: a "baseline" side runs natserve with these binaries, no peers.
AGAINST_BIN: Optional[Path] = None
#: Set by --against-src: that checkout's Python package too, not only its binaries.
AGAINST_SRC: Optional[Path] = None
NATSERVE_ENV: Dict[str, str] = {}
#: The peers that installed, with their versions (set in main from --peers).
PEER_VERSIONS: Dict[str, str] = {}
#: Those that would not install, with why: a line in each of their rows says so.
PEER_FAILED: Dict[str, str] = {}
#: Whose non-2xx responses fail the run: natserve's, and the reference it is tuned against.
STRICT = ("natserve", "baseline", "mosec")


def frameworks() -> List[str]:
    if AGAINST_BIN:
        return ["natserve", "baseline"]
    return ["natserve"] + [k for k in peers.PEERS if k in PEER_VERSIONS or k in PEER_FAILED]


def titles() -> Dict[str, str]:
    return {
        "natserve": "natserve",
        "baseline": "natserve, --against-bin",
        **{k: peers.PEERS[k].title for k in peers.PEERS},
    }


def app_env(framework: str, workload: str) -> Dict[str, str]:
    return {"BENCH_FRAMEWORK": framework, "BENCH_WORKLOAD": workload, "PYTHONUNBUFFERED": "1"}


def start_natserve(procs: Procs, tmp: Path, key: str, workload: str) -> Side:
    """natserve (or, as ``baseline``, the --against-bin build) serving ``workload``
    through a nats-server of its own, started here with monitoring on."""
    (tmp / key).mkdir()
    nats = nats_server(procs, tmp / key, f"nats-server-{workload}-{key}")
    port = free_port()
    env = {**app_env("natserve", workload), **NATSERVE_ENV}
    if key == "baseline" and AGAINST_BIN is not None:
        env["NATSERVE_BIN_DIR"] = str(AGAINST_BIN)
        if AGAINST_SRC is not None:
            env["PYTHONPATH"] = str(AGAINST_SRC / "python-worker")
    args = [str(NATSERVE_PY), str(APPS), "--port", str(port), "--address", "127.0.0.1",
            "--nats", nats.url]  # fmt: skip
    procs.start(f"{workload}-{key}", args, env)
    return Side(key, f"http://127.0.0.1:{port}", nats.varz)


def start_sides(
    procs: Procs, tmp: Path, workload: str, rows: List[Row], ready: Callable[..., None]
) -> List[Side]:
    """natserve (and the baseline) must come up; each peer that does not is left out of
    ``rows`` with why."""
    own = ["natserve"] + (["baseline"] if AGAINST_BIN else [])
    sides = [start_natserve(procs, tmp, key, workload) for key in own]
    for side in sides:
        ready(side.base)
    for row in rows:
        row.missing.update({k: why[:160] for k, why in PEER_FAILED.items()})
    for key in PEER_VERSIONS if AGAINST_BIN is None else []:
        try:
            sides.append(Side(key, peers.start(procs, key, workload, ready)))
        except peers.PeerError as err:
            print(f"  {peers.PEERS[key].title}: {err}", flush=True)
            for row in rows:
                row.missing[key] = str(err).split(";")[0]
    # Idle servers still cost something (Ray's controller and raylet poll): what the
    # machine spends with all of them up and none loaded is in each row's note.
    busy0, total0 = cpu_ticks()
    time.sleep(2.0)
    busy1, total1 = cpu_ticks()
    idle = f"machine {(busy1 - busy0) / max(1, total1 - total0):.0%} busy with all servers idle"
    for row in rows:
        row.note = "; ".join(x for x in (row.note, idle) if x)
    return sides


def alternate(
    rows: List[Row],
    sides: List[Side],
    measure: Callable[[Side, int, float], Run],
    seconds: float,
    warm_up: float,
) -> None:
    """Warms every server up at the highest concurrency (not recorded), then measures
    each row REPS times, the servers alternating, so drift hits them alike; the order
    flips every round (A B C, C B A), because going first is not neutral: the same build
    measured first read 0.77-0.86x of itself measured second on a loaded machine."""
    for side in sides:
        measure(side, max(row.concurrency for row in rows), warm_up)
    for row in rows:
        for rep in range(REPS):
            for side in sides if rep % 2 == 0 else list(reversed(sides)):
                run = measure(side, row.concurrency, seconds)
                row.runs.append(run)
                log_run(row, run)


def side_by_side(
    name: str, workload: str, concurrencies: List[int], seconds: float, logs: Path
) -> List[Row]:
    rows = [Row(name, c) for c in concurrencies]
    with tempfile.TemporaryDirectory() as tmp, processes(logs) as procs:
        sides = start_sides(procs, Path(tmp), workload, rows, wait_serving)
        alternate(rows, sides, wrk, seconds, warm_up=min(3.0, seconds))
    return rows


def time_to_first_event(concurrencies: List[int], seconds: float, logs: Path) -> List[Row]:
    """W6: the same SSEWorker under natserve and Mosec; p50/p99 are time to first event."""
    rows = [Row("W6 SSE time to first event", c) for c in concurrencies]
    for row in rows:
        row.note = f"p50/p99: time to the first of {SSE_EVENTS} events (1 ms apart)"
    with tempfile.TemporaryDirectory() as tmp, processes(logs) as procs:
        sides = start_sides(procs, Path(tmp), "sse", rows, wait_streaming)
        alternate(rows, sides, sse_clients, seconds, warm_up=min(2.0, seconds))
    return rows


def floor(concurrencies: List[int], seconds: float, logs: Path) -> List[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, processes(logs) as procs:
        nats = nats_server(procs, Path(tmp))
        side = Side("natserve", "", nats.varz)
        for c in concurrencies:
            row = Row("floor: JetStream publish-pull-reply-ack", c)

            def once(c: int = c) -> Run:
                busy0, total0 = cpu_ticks()
                out = subprocess.run(
                    [str(FLOOR), "--nats", nats.url, "--concurrency", str(c),
                     "--duration-s", f"{seconds:g}", "--warmup-s", "2"],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                busy1, total1 = cpu_ticks()
                return parse_run("natserve", out, (busy1 - busy0) / max(1, total1 - total0))

            # The floor's warm-up runs inside the count: its messages per round trip
            # read high by the warm-up's share.
            run = measured(side, once)
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
        nats = nats_server(procs, Path(tmp))
        url = nats.url
        env = {**app_env("natserve", "scaleout"), **NATSERVE_ENV}
        port = free_port()
        procs.start(
            "scaleout-ingress",
            [str(NATSERVE_PY), str(APPS), "--role", "ingress", "--nats", url,
             "--port", str(port), "--address", "127.0.0.1"],
            env,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        side = Side("natserve", base, nats.varz)
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
            wrk(side, concurrency, min(3.0, seconds))  # warm-up
            row = Row(f"W4 scale-out, {agents} agent{'s' if agents > 1 else ''}", concurrency)
            run = wrk(side, concurrency, seconds)
            row.runs.append(run)
            log_run(row, run)
            rows.append(row)
    base_rps = rows[0].runs[0].rps if rows else 0.0
    for row in rows:
        row.note = f"{row.runs[0].rps / base_rps:.2f}x one agent" if base_rps else ""
    return rows


def on_hosts(procs: Procs, net: netns.Network, tmp: Path, workload: str) -> tuple[Side, str]:
    """nats-server and the ingress of ``workload`` each in their namespace (agents come
    with `add_agent`): the ingress's side, seen from the root namespace, and the NATS URL."""
    nats = netns.nats_server(procs, net, "nats", tmp)
    rtt = [
        f"{host} {netns.connect_ms(net, host, 'nats', netns.NATS_PORT):.2f}"
        for host in net.addresses
        if host != "nats"
    ]
    net.paths = [f"TCP connect to nats from {', '.join(rtt)} ms"]
    procs.start(
        f"net-{workload}-ingress",
        net.exec("ingress", [str(NATSERVE_PY), str(APPS), "--role", "ingress", "--nats",
                             nats.url, "--port", "8000", "--address", net.addr("ingress")]),
        {**app_env("natserve", workload), **NATSERVE_ENV},
    )  # fmt: skip
    return Side("natserve", f"http://{net.addr('ingress')}:8000", nats.varz), nats.url


def add_agent(
    procs: Procs, net: netns.Network, side: Side, url: str, workload: str, n: int
) -> None:
    """Agent ``n`` (of one worker), in namespace ``agent-n``; returns once the ingress
    serves and counts ``n`` workers."""
    procs.start(
        f"net-{workload}-agent-{n}",
        net.exec(f"agent-{n}", [str(NATSERVE_PY), str(APPS), "--role", "agent", "--nats", url]),
        {**app_env("natserve", workload), **NATSERVE_ENV},
    )
    wait_serving(side.base)
    deadline = time.monotonic() + 60
    while stage_workers(side.base) < n and time.monotonic() < deadline:
        time.sleep(0.2)


def across_hosts(seconds: float, logs: Path) -> List[Row]:
    """W2 (one agent) and W4 (one agent, then two) with nats-server, the ingress and each
    agent in a network namespace of its own (netns.py), wrk in the root one: what a real
    network hop, with its latency, costs the batched path and the scale-out. Rows say why
    when the namespaces cannot be set up (not root, no iproute2), and the run goes on."""
    w2 = [Row("W2 across hosts (netns)", c) for c in (32, 128)]
    w4 = [Row(f"W4 across hosts, {n} agent{'s' if n > 1 else ''}", 128) for n in (1, 2)]
    try:
        with netns.network(["nats", "ingress", "agent-1", "agent-2"]) as net:
            with tempfile.TemporaryDirectory() as tmp, processes(logs) as procs:
                side, url = on_hosts(procs, net, Path(tmp), "batched")
                add_agent(procs, net, side, url, "batched", 1)
                for row in w2:
                    row.workload = f"W2 across hosts (netns, {net.label})"
                alternate(w2, [side], wrk, seconds, warm_up=min(3.0, seconds))
            with tempfile.TemporaryDirectory() as tmp, processes(logs) as procs:
                side, url = on_hosts(procs, net, Path(tmp), "scaleout")
                for n, row in enumerate(w4, start=1):
                    add_agent(procs, net, side, url, "scaleout", n)
                    wrk(side, row.concurrency, min(3.0, seconds))  # warm-up
                    run = wrk(side, row.concurrency, seconds)
                    row.runs.append(run)
                    log_run(row, run)
            for row in w2 + w4:
                row.note = net.note
    except netns.NetnsError as err:
        print(f"  no namespaces: {err}", flush=True)
        for row in w2 + w4:
            row.missing["natserve"] = f"not measured: {err}"
        return w2 + w4
    one = w4[0].runs[0].rps
    for row in w4:
        row.note = f"{row.runs[0].rps / one:.2f}x one agent; {row.note}" if one else row.note
    return w2 + w4


def uneven(concurrency: int, seconds: float, logs: Path) -> List[Row]:
    """A slow agent (20 ms per batch of 8) beside a fast one (2 ms), with the agents'
    prefetch off (pull only for idle workers), on (one batch ahead per worker) and auto
    (the default: ahead only where batches are short next to a pull)."""
    rows: List[Row] = []
    for prefetch in ("off", "on", "auto"):
        with tempfile.TemporaryDirectory() as tmp, processes(logs) as procs:
            nats = nats_server(procs, Path(tmp))
            url = nats.url
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
            side = Side("natserve", base, nats.varz)
            wait_serving(base)
            deadline = time.monotonic() + 60
            while stage_workers(base) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            wrk(side, concurrency, min(3.0, seconds))  # warm-up
            row = Row(f"W5 uneven agents (20 + 2 ms/batch), prefetch {prefetch}", concurrency)
            run = wrk(side, concurrency, seconds)
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
    nats = subprocess.run([str(NATS_SERVER), "--version"], capture_output=True, text=True)
    # The build that ran (NATSERVE_BIN_DIR, else the one installed beside .venv's natserve).
    probe = "from natserve._binaries import find; print(find('natserve-ingress'))"
    ingress = subprocess.run(
        [str(NATSERVE_PY), "-c", probe],
        capture_output=True, text=True, env={**os.environ, **NATSERVE_ENV},
    ).stdout.strip()  # fmt: skip
    built = (
        datetime.datetime.fromtimestamp(os.stat(ingress).st_mtime, datetime.timezone.utc)
        if ingress
        else None
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{mem_kb / 1024 / 1024:.0f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "load generator": f"{wrk_version.strip()}, -t{WRK_THREADS}, keep-alive, check.lua",
        "nats-server": nats.stdout.strip().removeprefix("nats-server: "),
        **{peers.PEERS[k].dist: v for k, v in PEER_VERSIONS.items()},
        "natserve commit": commit,
        "natserve binaries": f"{ingress} (built {built:%Y-%m-%d %H:%M} UTC)" if built else "?",
    }


def write_docs(md: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    DOCS.write_text(f"{before}{BEGIN}\n{md}\n{END}{after}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument(
        "--only", default="floor,W1,W2,W3,W4,W5,W6,net", help="comma-separated subset"
    )
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
    parser.add_argument(
        "--peers",
        default=",".join(peers.PEERS),
        help="comma-separated servers to measure natserve against, of "
        f"{', '.join(peers.PEERS)} ('none': natserve alone); each is installed into its "
        "own virtualenv when missing, and left out (saying why) if it will not install",
    )
    args = parser.parse_args()
    keys = [k for k in args.peers.split(",") if k and k != "none"]
    unknown = [k for k in keys if k not in peers.PEERS]
    if unknown:
        parser.error(f"--peers {args.peers}: unknown {', '.join(unknown)}; "
                     f"expected some of {', '.join(peers.PEERS)} or none")  # fmt: skip
    for item in args.natserve_env:
        name, _, value = item.partition("=")
        NATSERVE_ENV[name] = value
    if args.against_bin:
        global AGAINST_BIN
        AGAINST_BIN = args.against_bin.resolve()
        args.no_docs = True
        print(f"the baseline lines are natserve with the binaries in {AGAINST_BIN} (no peers)")
    if args.against_src:
        global AGAINST_SRC
        AGAINST_SRC = args.against_src.resolve()
        print(f"... and the Python package of {AGAINST_SRC}")
    only = set(args.only.split(","))
    for need in (NATSERVE_PY, NATS_SERVER) + ((FLOOR,) if "floor" in only else ()):
        if not need.exists():
            print(f"missing {need}: run `make bench`, which installs everything", file=sys.stderr)
            return 2
    if shutil.which("wrk") is None:
        print("wrk not found: run `make bench` (apt-get install wrk)", file=sys.stderr)
        return 2
    if AGAINST_BIN is None and only & {"W1", "W2", "W3", "W6"}:
        ready, failed = peers.select(keys)
        PEER_VERSIONS.update(ready)
        PEER_FAILED.update(failed)
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
    if "net" in only:
        print("net: W2 and W4 across network namespaces (0.25 ms per veth end)", flush=True)
        rows += across_hosts(d, logs)

    summaries = [summary(r, frameworks()) for r in rows]
    md_table = table(summaries, titles())
    info = machine()
    args_line = " ".join(sys.argv[1:])
    if os.environ.get("MAKELEVEL"):  # under make
        command = "make bench" + (f"  # run.py {args_line}" if args_line else "")
    else:
        command = f"tests/bench/run.py {args_line}".strip()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = {"date": when, "command": command, "machine": info, "rows": summaries}
    (RESULTS / "bench.json").write_text(json.dumps(report, indent=2))
    print()
    print(md_table)
    print(f"\n{time.monotonic() - started:.0f} s; JSON in {RESULTS / 'bench.json'}")
    if not args.no_docs:
        md = "\n".join(
            [f"Run {when} with `{command}` ({d:g} s per measurement, "
             f"{REPS} alternating runs per server, means shown).", ""]
            + [f"- {k}: {v}" for k, v in info.items()]
            + ["", md_table]
        )  # fmt: skip
        write_docs(md)

    def errors_of(keys: tuple[str, ...]) -> int:
        return sum(
            d.get("errors", 0) for s in summaries for f, d in s["servers"].items() if f in keys
        )

    others = tuple(k for k in PEER_VERSIONS if k not in STRICT)
    if errors_of(others):
        print(f"note: {errors_of(others)} responses of {', '.join(others)} were not right")
    errors = errors_of(STRICT)
    if errors:
        print(f"{errors} responses were not a 200 with the right body", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
