"""Where natserve's broker messages go: one workload of ``apps.py`` on a nats-server of
its own, a wrk run, and per request the messages each connection sent and received
(nats-server's ``/connz``) and the CPU time each process spent (``/proc``), then a
second run with a ``>`` subscriber counting the messages by subject (ids folded to
``*``; it slows that run, so read its counts per request, not its speed).

    .venv/bin/python tests/bench/census.py echo --concurrency 32 [--bin-dir DIR]

``--framework mosec`` runs the same workload under Mosec (from ``.bench-venv``, which
``run.py`` installs) for its CPU per request; it has no broker to count.

Workloads: echo (W1), batched (W2), pipeline (W3). Not part of ``make bench``: a probe
for deciding what to change, whose numbers docs/benchmarks.md cites with this command.
"""

import argparse
import asyncio
import collections
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from natserve._nats_server import server_env
from procs import process_stats

REPO = Path(__file__).resolve().parents[2]
PY = REPO / ".venv" / "bin" / "python"
NATS_SERVER = REPO / ".venv" / "bin" / "nats-server"
LUA = REPO / "tests" / "bench" / "check.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_by_process(roots: list) -> dict:
    """CPU seconds (user + system) of each process under ``roots``, by pid: (name, s)."""
    stats = process_stats()
    children = collections.defaultdict(list)
    for pid, stat in stats.items():
        children[stat.ppid].append(pid)
    tree, todo = {}, [pid for pid in roots if pid in stats]
    while todo:
        pid = todo.pop()
        tree[pid] = (stats[pid].name, stats[pid].cpu_s)
        todo += children[pid]
    return tree


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def wrk(base: str, concurrency: int, seconds: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds}s", "-s", str(LUA), base + "/inference"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("BENCH_JSON "))
    return json.loads(line[len("BENCH_JSON ") :])


async def by_subject(url: str, base: str, concurrency: int, seconds: int):
    import nats

    nc = await nats.connect(url)
    counts: collections.Counter = collections.Counter()

    async def count(msg) -> None:
        subject = re.sub(r"[0-9a-f]{8,}|[A-Za-z0-9]{20,}", "*", msg.subject)
        counts[re.sub(r"\.\d+(\.\d+)+(\.\*)?(\.\d+)?$", ".<ack>", subject)] += 1

    await nc.subscribe(">", cb=count)
    run = await asyncio.to_thread(wrk, base, concurrency, seconds)
    await asyncio.sleep(1)
    await nc.close()
    return counts, run["requests"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=["echo", "batched", "pipeline"])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--bin-dir", help="natserve binaries to run (NATSERVE_BIN_DIR)")
    ap.add_argument("--framework", choices=["natserve", "mosec"], default="natserve")
    args = ap.parse_args()
    mosec = args.framework == "mosec"

    nats_port, monitor, http = free_port(), free_port(), free_port()
    env = {**os.environ, "BENCH_FRAMEWORK": args.framework, "BENCH_WORKLOAD": args.workload}
    if args.bin_dir:
        env["NATSERVE_BIN_DIR"] = args.bin_dir
    with tempfile.TemporaryDirectory() as store:
        broker = subprocess.Popen(
            [str(NATS_SERVER), "-js", "-a", "127.0.0.1", "-p", str(nats_port),
             "-m", str(monitor), "-sd", store],
            env=server_env(os.environ, os.cpu_count()),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"nats://127.0.0.1:{nats_port}"
        python = REPO / ".bench-venv" / "bin" / "python" if mosec else PY
        served = [] if mosec else ["--nats", url]
        app = subprocess.Popen(
            [str(python), str(REPO / "tests" / "bench" / "apps.py"), "--port", str(http),
             "--address", "127.0.0.1", *served],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        base = f"http://127.0.0.1:{http}"
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(base + "/", timeout=1)
                    break
                except OSError:
                    time.sleep(0.2)
            wrk(base, args.concurrency, 2)  # warm-up
            mon = f"http://127.0.0.1:{monitor}"
            roots = [app.pid] if mosec else [broker.pid, app.pid]
            connz = mon + "/connz?limit=100"
            before = {} if mosec else {c["cid"]: c for c in get(connz)["connections"]}
            cpu_before = cpu_by_process(roots)
            run = wrk(base, args.concurrency, args.seconds)
            cpu_after = cpu_by_process(roots)
            after = {} if mosec else {c["cid"]: c for c in get(connz)["connections"]}
            n = run["requests"]
            rate = n / (run["duration_us"] / 1e6)
            print(
                f"{args.workload} c={args.concurrency}: {rate:.0f} req/s, "
                f"p50 {run['p50_us'] / 1e3:.2f} ms, p99 {run['p99_us'] / 1e3:.2f} ms, "
                f"max {run['max_us'] / 1e3:.1f} ms, "
                f"non-2xx {run['non_2xx']}, wrong bodies {run['bad_body']}"
            )
            print("CPU per request, by process (wrk's own not counted)")
            total = 0.0
            for pid, (name, secs) in sorted(cpu_after.items()):
                spent = (secs - cpu_before.get(pid, (name, 0.0))[1]) / n * 1e6
                total += spent
                if spent >= 0.5:
                    print(f"  {name[:24]:24s} pid {pid:7d}  {spent:7.1f} us")
            print(f"  {'all':24s} {'':11s}  {total:7.1f} us")
            if mosec:
                return 0
            print("messages per request, by connection (in: it sent; out: it received)")
            for cid, c in sorted(after.items()):
                b = before.get(cid, {"in_msgs": 0, "out_msgs": 0})
                print(
                    f"  {c.get('name', '')[:32]:32s} in {(c['in_msgs'] - b['in_msgs']) / n:6.3f}"
                    f"  out {(c['out_msgs'] - b['out_msgs']) / n:6.3f}"
                )
            counts, m = asyncio.run(by_subject(url, base, args.concurrency, 3))
            print(f"messages per request, by subject (published once each; {m} requests)")
            for subject, k in counts.most_common(20):
                print(f"  {k / m:7.3f}  {subject}")
        finally:
            app.terminate()
            app.wait(15)
            broker.terminate()
            broker.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
