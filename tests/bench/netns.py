"""Hosts for the across-hosts case (``run.py --only net``): one Linux network namespace per
process (nats-server, the ingress, each agent) on this machine, joined by a bridge, so
every hop between them is a real network path, not loopback.

The bridge ``br0`` lives in a namespace of its own, ``nsb-switch``, and not in the root
namespace: with ``br_netfilter`` loaded (``net.bridge.bridge-nf-call-iptables = 1``)
bridged frames go through iptables' FORWARD chain, which Docker sets to DROP, and the
bridge's own ``nf_call_iptables 0`` cannot override the machine-wide sysctl. A fresh
namespace has an empty firewall, so nothing of the machine's is changed. Each host is a
namespace ``nsb-NAME`` whose ``eth0`` (10.77.0.2 and up, loopback up too) is a veth to
``NAME`` on the bridge; the root namespace, where wrk runs, joins it the same way through
``nsb-root`` (10.77.0.1). ``tc netem`` delays both ends of every veth, so each direction
of a veth has the delay, and every hop, host to host or wrk to the ingress, crosses two
veths: twice the delay each way. A kernel without ``sch_netem`` keeps the namespaces and
says so: the hops are then real ones with no added delay.

Everything is named ``nsb-``: ``clean()`` removes what a crashed earlier run left (its
processes, namespaces and links) before a run and again after it, whatever ended it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from procs import NATS_SERVER, NatsServer, Procs, broker_messages

PREFIX = "nsb-"
SWITCH = f"{PREFIX}switch"
BRIDGE = "br0"
#: The root namespace's veth onto the bridge.
ROOT_LINK = f"{PREFIX}root"
SUBNET = "10.77.0"
#: Added by netem on each veth end, that is to each direction of every veth.
DELAY_MS = 0.25
NATS_PORT, NATS_HTTP_PORT = 4222, 8222


class NetnsError(RuntimeError):
    """The namespaces could not be set up; the message says why, for the rows."""


@dataclass
class Network:
    """Hosts by name and address, and the delay each veth end really has."""

    addresses: Dict[str, str]
    #: Milliseconds netem adds per veth end; 0.0 where it could not (``no_delay`` says why).
    delay_ms: float
    no_delay: str = ""
    #: What was measured of the paths (TCP connect times), for the rows' notes.
    paths: List[str] = field(default_factory=list)

    def addr(self, host: str) -> str:
        return self.addresses[host]

    def exec(self, host: str, args: List[str]) -> List[str]:
        """``args`` run inside ``host``'s namespace (``ip netns exec`` execs them, so the
        pid `Procs` holds is the process itself)."""
        return ["ip", "netns", "exec", PREFIX + host, *args]

    @property
    def label(self) -> str:
        """The delay of one hop each way: two veths, each delayed at both ends."""
        return f"{2 * self.delay_ms:g} ms each way" if self.delay_ms else "no added delay"

    @property
    def note(self) -> str:
        added = f"netem {self.delay_ms:g} ms on each veth end" if self.delay_ms else self.no_delay
        return "; ".join([added, *self.paths])


def run(args: List[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def must(args: List[str]) -> None:
    done = run(args)
    if done.returncode != 0:
        raise NetnsError(f"`{' '.join(args)}` failed: {done.stderr.strip()[:200]}")


def ours() -> List[str]:
    """Namespaces named ``nsb-``, this run's or a crashed one's."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def clean() -> None:
    """Removes every ``nsb-`` namespace (killing what still runs in it, which would keep it
    alive unnamed), then every ``nsb-`` link; safe to call when there is nothing."""
    for ns in ours():
        for pid in run(["ip", "netns", "pids", ns]).stdout.split():
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "netns", "delete", ns])
    # Deleting a namespace takes its veth pair with it, but not at once.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        links = [
            line.split(":")[1].strip().split("@")[0]
            for line in run(["ip", "-o", "link", "show"]).stdout.splitlines()
        ]
        left = [name for name in links if name.startswith(PREFIX)]
        if not left:
            return
        for name in left:
            run(["ip", "link", "delete", name])
        time.sleep(0.1)


def netem(ns: List[str], dev: str, delay_ms: float) -> str:
    """Delays what ``dev`` sends by ``delay_ms``; returns why not ("" when it does)."""
    done = run(["tc", *ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{delay_ms}ms"])
    if done.returncode == 0:
        return ""
    err = done.stderr.strip().removeprefix("Error: ")[:120]
    return f"no added delay: tc netem says {err!r} (a kernel without sch_netem?)"


def attach(ns: Optional[str], end: str, address: str, delay_ms: float) -> str:
    """A veth from ``end`` in namespace ``ns`` (the root one if None) to the bridge, where
    its other end has the host's name (``root`` for the root namespace); returns why netem
    would not add ``delay_ms`` ("" when it did)."""
    on_bridge = "root" if ns is None else ns.removeprefix(PREFIX)
    if len(on_bridge) > 15:  # Linux's interface names
        raise NetnsError(f"host name {on_bridge!r} is longer than an interface name (15)")
    inside = [] if ns is None else ["-n", ns]
    sw = ["-n", SWITCH]
    must(["ip", *inside, "link", "add", "name", end, "type", "veth",
          "peer", "name", on_bridge, "netns", SWITCH])  # fmt: skip
    must(["ip", *sw, "link", "set", "dev", on_bridge, "master", BRIDGE, "up"])
    must(["ip", *inside, "addr", "add", f"{address}/24", "dev", end])
    must(["ip", *inside, "link", "set", "dev", end, "up"])
    return netem(sw, on_bridge, delay_ms) or netem(inside, end, delay_ms)


@contextmanager
def network(hosts: List[str], delay_ms: float = DELAY_MS) -> Iterator[Network]:
    """The switch, the root namespace on it and a namespace per host, all removed when the
    block ends, by an error, Ctrl-C or SIGTERM too (raised here as SystemExit, so that it
    unwinds through the callers' cleanup)."""
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (ip netns); this bench runs as a user")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsError(f"no {' or '.join(missing)} on PATH (iproute2)")
    if len(hosts) > 200:
        raise NetnsError(f"{len(hosts)} hosts: at most 200 fit in {SUBNET}.0/24")
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    clean()
    try:
        must(["ip", "netns", "add", SWITCH])
        must(["ip", "-n", SWITCH, "link", "add", "name", BRIDGE, "type", "bridge"])
        must(["ip", "-n", SWITCH, "link", "set", "dev", BRIDGE, "up"])
        whys = [attach(None, ROOT_LINK, f"{SUBNET}.1", delay_ms)]
        addresses = {name: f"{SUBNET}.{n}" for n, name in enumerate(hosts, start=2)}
        for name, address in addresses.items():
            must(["ip", "netns", "add", PREFIX + name])
            must(["ip", "-n", PREFIX + name, "link", "set", "dev", "lo", "up"])
            whys.append(attach(PREFIX + name, "eth0", address, delay_ms))
        why = next((w for w in whys if w), "")
        yield Network(addresses, 0.0 if why else delay_ms, why)
    finally:
        clean()
        signal.signal(signal.SIGTERM, previous)


def connect_ms(net: Network, host: str, to: str, port: int, times: int = 20) -> float:
    """Median TCP connect time (one round trip) from inside ``host`` to ``port`` of host
    ``to``; raises if the path is blocked, which would otherwise show only as a server
    that never gets ready."""
    address = net.addr(to)
    probe = (
        "import socket, statistics, sys, time\n"
        "a, p, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
        "ts = []\n"
        "for _ in range(n):\n"
        "    t = time.perf_counter()\n"
        "    socket.create_connection((a, p), timeout=2).close()\n"
        "    ts.append(time.perf_counter() - t)\n"
        "print(statistics.median(ts) * 1e3)\n"
    )
    done = run(net.exec(host, [sys.executable, "-c", probe, address, str(port), str(times)]))
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
        raise NetnsError(
            f"{host} cannot reach {address}:{port} over {SWITCH} ({tail[0][:120]}); "
            "a firewall dropping bridged traffic?"
        )
    return float(done.stdout)


def nats_server(procs: Procs, net: Network, host: str, tmp: Path) -> NatsServer:
    """A nats-server with JetStream inside ``host``, as ``procs.nats_server`` starts one,
    listening on the host's address; its monitoring port answers the root namespace."""
    addr = net.addr(host)
    conf = tmp / "nats.conf"
    conf.write_text(
        f'listen: "{addr}:{NATS_PORT}"\nhttp: "{addr}:{NATS_HTTP_PORT}"\nmax_payload: 16MB\n'
        f'jetstream {{ store_dir: "{tmp / "js"}" }}\n'
    )
    proc = procs.start(
        f"net-nats-server-{tmp.name}", net.exec(host, [str(NATS_SERVER), "-c", str(conf)])
    )
    server = NatsServer(f"nats://{addr}:{NATS_PORT}", f"http://{addr}:{NATS_HTTP_PORT}/varz")
    deadline = time.monotonic() + 20
    last: Any = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server in {PREFIX}{host} exited with code {proc.returncode}")
        try:
            broker_messages(server.varz)
            socket.create_connection((addr, NATS_PORT), timeout=0.5).close()
            return server
        except OSError as err:
            last = err
            time.sleep(0.05)
    raise RuntimeError(f"nats-server in {PREFIX}{host} not reachable at {addr}: {last}")
