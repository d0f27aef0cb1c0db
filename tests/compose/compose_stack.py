"""Runs docker-compose.yml (plus the test override) as a throwaway project: a unique
project name, free host ports on 127.0.0.1, and `down -v` however the test ends.

Works with `docker compose` (v2) and `docker-compose` (1.29): ``NATSERVE_COMPOSE`` picks
one ("docker compose" or "docker-compose"), else v2 when present.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILES = (
    REPO / "docker-compose.yml",
    Path(__file__).resolve().parent / "docker-compose.test.yml",
)


def _ok(argv: Sequence[str], timeout: float = 30) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def compose_command() -> Optional[List[str]]:
    forced = os.environ.get("NATSERVE_COMPOSE", "").split()
    if forced:
        return forced
    if _ok(["docker", "compose", "version"]):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def unavailable_reason() -> Optional[str]:
    """Why the compose test cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    proc = None
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "no Docker engine reachable (docker info timed out)"
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["docker info failed"])[0]
        return f"no Docker engine reachable ({first})"
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def http(method: str, url: str, body: Optional[bytes] = None, timeout: float = 10.0) -> Response:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, resp.read())
    except urllib.error.HTTPError as err:
        return Response(err.code, err.read())


def parse_metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if not m:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


class Stack:
    """One compose project made of docker-compose.yml and the test override."""

    def __init__(self, images_env: Dict[str, str], log_file: Optional[Path] = None) -> None:
        self.log_file = log_file
        command = compose_command()
        assert command is not None
        self.command = command
        self.project = f"natserve-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.http_port = free_port()
        self.env = dict(os.environ)
        self.env.update(images_env)
        self.env.update(
            NATSERVE_HTTP_BIND="127.0.0.1",
            NATSERVE_HTTP_PORT=str(self.http_port),
            NATSERVE_NATS_BIND="127.0.0.1",
            NATSERVE_NATS_PORT=str(free_port()),
        )
        self.base_url = f"http://127.0.0.1:{self.http_port}"

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        argv = [*self.command, "-p", self.project]
        for f in COMPOSE_FILES:
            argv += ["-f", str(f)]
        proc = subprocess.run(
            [*argv, *args], capture_output=True, text=True, env=self.env, timeout=timeout, cwd=REPO
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv + list(args))} failed ({proc.returncode}):\n"
                f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        return proc.stdout + proc.stderr

    def up(self, *args: str) -> None:
        self.compose("up", "-d", "--no-build", *args)

    def down(self) -> None:
        """Removes the project, first saving its logs to ``log_file`` if anything ran."""
        if self.log_file is not None and self.containers(all=True):
            self.log_file.write_text(self.logs())
        self.compose("down", "-v", "--remove-orphans", timeout=240)

    def logs(self) -> str:
        return self.compose("logs", "--no-color", check=False)

    # -- what is running, seen through the engine ------------------------------------

    def _label_filter(self, service: Optional[str] = None) -> List[str]:
        argv = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            argv += ["--filter", f"label=com.docker.compose.service={service}"]
        return argv

    def containers(self, service: Optional[str] = None, all: bool = False) -> List[str]:
        argv = ["docker", "ps", "-q", "--no-trunc", *self._label_filter(service)]
        if all:
            argv.append("-a")
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()

    def leftovers(self) -> Dict[str, List[str]]:
        """Containers, networks and volumes of this project still known to the engine."""
        label = ["--filter", f"label=com.docker.compose.project={self.project}"]
        found = {}
        for kind, argv in (
            ("containers", ["docker", "ps", "-a", "-q", *label]),
            ("networks", ["docker", "network", "ls", "-q", *label]),
            ("volumes", ["docker", "volume", "ls", "-q", *label]),
        ):
            found[kind] = subprocess.run(
                argv, capture_output=True, text=True, check=True
            ).stdout.split()
        return found

    @staticmethod
    def inspect(container: str, template: str) -> str:
        return subprocess.run(
            ["docker", "inspect", "-f", template, container], capture_output=True, text=True
        ).stdout.strip()

    def health(self, container: str) -> str:
        return self.inspect(container, "{{if .State.Health}}{{.State.Health.Status}}{{end}}")

    def wait_healthy(self, service: str, count: int, timeout: float = 120) -> List[str]:
        deadline = time.monotonic() + timeout
        states: Dict[str, str] = {}
        while time.monotonic() < deadline:
            ids = self.containers(service)
            states = {c[:12]: self.health(c) for c in ids}
            if len(ids) == count and all(s == "healthy" for s in states.values()):
                return ids
            time.sleep(1)
        raise AssertionError(f"{service}: wanted {count} healthy containers, have {states}")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = http("GET", self.base_url + "/", timeout=2)
                if last.status == 200:
                    return
            except OSError as err:
                last = err  # type: ignore[assignment]
            time.sleep(0.5)
        raise AssertionError(f"ingress not ready after {timeout} s: {last!r}")

    def agent_metrics(self, container: str) -> str:
        """The agent's own /metrics, read inside its container (the port is not published)."""
        url = "http://127.0.0.1:9100/metrics"
        code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
        return subprocess.run(
            ["docker", "exec", container, "python", "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout


@dataclass
class Outcome:
    started: float  # monotonic
    elapsed: float
    status: Optional[int]  # None: no HTTP answer
    error: str = ""


class Load:
    """``threads`` clients posting ``{"x": i}`` back to back until stopped."""

    def __init__(self, url: str, threads: int, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.outcomes: List[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(threads)]

    def _client(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            x = n * 1_000_000 + i
            i += 1
            started = time.monotonic()
            try:
                resp = http("POST", self.url, json.dumps({"x": x}).encode(), timeout=self.timeout)
                outcome = Outcome(started, time.monotonic() - started, resp.status)
                if resp.status == 200 and resp.json().get("y") != 2.0 * x:  # type: ignore[union-attr]
                    outcome.error = f"wrong answer for x={x}: {resp.body!r}"
            except Exception as err:
                outcome = Outcome(started, time.monotonic() - started, None, repr(err))
            with self._lock:
                self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
