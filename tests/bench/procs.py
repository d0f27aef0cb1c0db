"""The bench's processes and ports: free loopback ports, CPU ticks, the servers it starts
(each in its own session, stopped in reverse), readiness by a real request, and the
nats-server it starts with monitoring on, whose ``/varz`` counts broker messages."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from natserve._nats_server import server_env

REPO = Path(__file__).resolve().parents[2]
NATS_SERVER = REPO / ".venv" / "bin" / "nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(x for x in text.strip().splitlines()[-lines:]) or "(empty log)"


class Procs:
    """Processes started for one workload; stopped (SIGTERM, then SIGKILL) in reverse.

    Each starts a session of its own, and whatever is left in that session once its
    leader is gone is killed too: frameworks that fork helpers (Ray's raylet and
    workers, LitServe's inference processes) do not outlive their run."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: List[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, args: List[str], env: Optional[Dict[str, str]] = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def stop(self, proc: Optional[subprocess.Popen[bytes]] = None) -> None:
        for p in [proc] if proc else list(reversed(self.procs)):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(40)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            kill_session(p.pid)
            self.procs.remove(p)


@dataclass
class ProcStat:
    """What ``/proc/<pid>/stat`` says of one process."""

    name: str
    ppid: int
    session: int
    cpu_s: float  # user + system


def process_stats() -> Dict[int, ProcStat]:
    """Every live process, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out: Dict[int, ProcStat] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
            # After "(comm)": state ppid pgrp session ... utime (12th) stime (13th).
            fields = raw.rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = ProcStat(
                name=raw[raw.index("(") + 1 : raw.rindex(")")],
                ppid=int(fields[1]),
                session=int(fields[3]),
                cpu_s=(int(fields[11]) + int(fields[12])) / tick,
            )
        except (OSError, IndexError, ValueError):
            continue
    return out


def kill_session(sid: int) -> None:
    """SIGKILL to every process left in session ``sid`` (Ray's actors each take a
    process group of their own, but stay in their driver's session)."""
    for pid, stat in process_stats().items():
        if stat.session == sid:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@contextmanager
def processes(logs: Path) -> Iterator[Procs]:
    procs = Procs(logs)
    try:
        yield procs
    finally:
        procs.stop()


def post(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=b'{"x": 1, "y": 3}', method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_serving(
    base: str, timeout: float = 90.0, proc: Optional[subprocess.Popen[bytes]] = None
) -> None:
    """Until a real request gets a right answer (readiness endpoints differ); raises at
    once if ``proc``, the server, has exited."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}")
        try:
            last = post(base + "/inference")
            if last[0] == 200 and re.search(rb'"y":\s*3\b', last[1]):
                return
        except OSError as err:
            last = err
        time.sleep(0.2)
    raise TimeoutError(f"{base} never served within {timeout:.0f} s: {last}")


@dataclass
class NatsServer:
    url: str
    #: The monitoring endpoint's /varz.
    varz: str


def nats_server(procs: Procs, tmp: Path, name: str = "nats-server") -> NatsServer:
    """Starts a nats-server with JetStream and monitoring on free loopback ports."""
    port, http_port = free_port(), free_port()
    conf = tmp / "nats.conf"
    # max_payload as the launcher's own nats-server has it (room for a 10 MiB body).
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\nhttp: "127.0.0.1:{http_port}"\nmax_payload: 16MB\n'
        f'jetstream {{ store_dir: "{tmp / "js"}" }}\n'
    )
    # Its threads as the launcher's own nats-server has them (half the cores).
    procs.start(name, [str(NATS_SERVER), "-c", str(conf)], server_env(os.environ, os.cpu_count()))
    server = NatsServer(f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{http_port}/varz")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            broker_messages(server.varz)
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    return server


def broker_messages(varz: str) -> int:
    """Messages nats-server has taken in and sent out since it started (``/varz``)."""
    with urllib.request.urlopen(varz, timeout=5) as resp:
        d = json.loads(resp.read())
    return int(d["in_msgs"]) + int(d["out_msgs"])


@dataclass
class Side:
    """One server under load in a workload: its key, base URL and, for natserve, the
    ``/varz`` of the nats-server its requests go through."""

    key: str
    base: str
    varz: Optional[str] = None


def broker_count(side: Side) -> Optional[int]:
    return broker_messages(side.varz) if side.varz else None
