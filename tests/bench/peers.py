"""The servers natserve is measured against: Mosec, Ray Serve and LitServe, each from
PyPI in a virtualenv of its own, installed by the bench the first time it needs one.

A peer that fails to install or to start is reported (why, and its log's last lines)
and left out; the bench goes on with the others. A workload a peer has no form of is a
cell that says so, not a number.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from procs import REPO, Procs, free_port, log_tail, wait_serving

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps.py"
PEER_APPS = HERE / "peer_apps"
INSTALL_TIMEOUT_S = 900


@dataclass(frozen=True)
class Peer:
    key: str
    title: str
    #: Its virtualenv, relative to the repository.
    venv: str
    requirement: str
    #: The distribution whose version the table shows.
    dist: str
    app: Path
    #: Workloads it has no form of, and why (what the table's cell says).
    lacks: Dict[str, str] = field(default_factory=dict)
    #: Seconds it may take from start to its first right answer.
    start_timeout_s: float = 90.0
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def python(self) -> Path:
        return REPO / self.venv / "bin" / "python"


PEERS: Dict[str, Peer] = {
    p.key: p
    for p in (
        Peer("mosec", "Mosec", ".bench-venv", "mosec==0.9.8", "mosec", APPS),
        Peer(
            "ray",
            "Ray Serve",
            ".bench-ray",
            "ray[serve]==2.60.0",
            "ray",
            PEER_APPS / "ray_app.py",
            # A private Ray cluster starts first (GCS, raylet, Serve's controller and proxy).
            start_timeout_s=240.0,
            env={"RAY_DEDUP_LOGS": "0"},
        ),
        Peer(
            "litserve",
            "LitServe",
            ".bench-litserve",
            "litserve==0.2.19",
            "litserve",
            PEER_APPS / "litserve_app.py",
            lacks={"pipeline": "no multi-stage pipeline in LitServe"},
        ),
    )
}


class PeerError(RuntimeError):
    """A peer that could not be installed or started; the message says why."""


def version(peer: Peer) -> Optional[str]:
    if not peer.python.exists():
        return None
    out = subprocess.run(
        [str(peer.python), "-c",
         f"import importlib.metadata as m; print(m.version({peer.dist!r}))"],
        capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 else None


def ensure(peer: Peer) -> str:
    """Its version, installing it into its virtualenv first where it is missing."""
    wanted = peer.requirement.split("==", 1)[1] if "==" in peer.requirement else None
    have = version(peer)
    if have is not None and (wanted is None or have == wanted):
        return have
    venv = REPO / peer.venv
    print(f"installing {peer.requirement} into {peer.venv} (once)", flush=True)
    steps = [] if peer.python.exists() else [[sys.executable, "-m", "venv", str(venv)]]
    steps.append([str(peer.python), "-m", "pip", "install", "--quiet", peer.requirement])
    for step in steps:
        try:
            out = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise PeerError(f"`{' '.join(step)}` took over {INSTALL_TIMEOUT_S} s") from None
        if out.returncode != 0:
            tail = " | ".join((out.stderr or out.stdout).strip().splitlines()[-4:])
            raise PeerError(f"`{' '.join(step)}` exited {out.returncode}: {tail}")
    have = version(peer)
    if have is None:
        raise PeerError(f"{peer.dist} is not importable in {peer.venv} after installing it")
    return have


def select(keys: List[str]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """The peers among ``keys`` that are installed (installing those missing), with
    their versions, and those that would not install, with why (also on stderr)."""
    ready: Dict[str, str] = {}
    failed: Dict[str, str] = {}
    for key in keys:
        peer = PEERS[key]
        try:
            ready[key] = ensure(peer)
        except (PeerError, OSError) as err:
            print(f"{peer.title} left out: {err}", file=sys.stderr, flush=True)
            failed[key] = f"did not install: {err}"
    return ready, failed


def start(procs: Procs, key: str, workload: str, ready: Callable[..., None] = wait_serving) -> str:
    """Starts peer ``key`` serving ``workload``; its base URL once ``ready(base,
    timeout, proc)`` returns (a right answer)."""
    peer = PEERS[key]
    if workload in peer.lacks:
        raise PeerError(peer.lacks[workload])
    port = free_port()
    name = f"{workload}-{key}"
    env = {
        "BENCH_FRAMEWORK": key,
        "BENCH_WORKLOAD": workload,
        "PYTHONUNBUFFERED": "1",
        **peer.env,
    }
    args = [str(peer.python), str(peer.app), "--port", str(port), "--address", "127.0.0.1"]
    proc = procs.start(name, args, env)
    base = f"http://127.0.0.1:{port}"
    try:
        ready(base, peer.start_timeout_s, proc)
    except (RuntimeError, TimeoutError) as err:
        procs.stop(proc)
        why = f"did not start ({err}); {procs.log(name)}: {log_tail(procs.log(name))}"
        raise PeerError(why) from None
    return base
