"""Fixtures for integration tests: a real nats-server, real natserve programs (launcher,
Rust ingress and agent, Python worker processes) on ephemeral ports, and a tiny HTTP
client. Every process a test starts is stopped when the test ends, even on failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from natserve._binaries import find

REPO = Path(__file__).resolve().parents[2]
APPS = Path(__file__).resolve().parent / "apps"
EXAMPLES = REPO / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Response:
    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> object:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


def http(
    method: str,
    url: str,
    body: Optional[bytes] = None,
    timeout: float = 30.0,
    headers: Optional[Dict[str, str]] = None,
) -> Response:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as err:
        return Response(err.code, dict(err.headers), err.read())


class EventStream:
    """A Server-Sent Events response read as it arrives: ``events()`` yields
    ``(event, data)`` pairs (event ``message`` when the server named none, as browsers and
    httpx-sse read it); ``close()`` hangs up, as a client that goes away."""

    def __init__(self, url: str, body: bytes, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self._conn = HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self._conn.request("POST", parts.path, body=body)
        self.response = self._conn.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}

    def events(self) -> Iterator[Tuple[str, str]]:
        event, data = "message", []
        for raw in self.response:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    yield event, "\n".join(data)
                event, data = "message", []
            elif line.startswith(":"):
                continue  # keep-alive comment
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)

    def all(self) -> List[Tuple[str, str]]:
        try:
            return list(self.events())
        finally:
            self.close()

    def close(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()


class Proc:
    """A started process with its output in a log file, stopped on `stop()`."""

    def __init__(self, args: List[str], log: Path, env: Optional[Dict[str, str]] = None):
        self.args = args
        self.log = log
        full_env = dict(os.environ)
        # natserve from this source tree, in the launcher and (inherited through the agent)
        # in every worker process, rather than whatever copy is installed in the venv.
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "python-worker"), os.environ.get("PYTHONPATH")) if p
        )
        full_env.update(env or {})
        self._out = open(log, "wb")
        self.popen = subprocess.Popen(
            args, stdout=self._out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()
        return self.popen.returncode


class NatsNode:
    """One nats-server of a cluster: its client URL, monitoring port and process."""

    def __init__(self, name: str, url: str, monitor: int, proc: Proc) -> None:
        self.name = name
        self.url = url
        self.monitor = monitor
        self.proc = proc

    def monitoring(self, path: str, timeout: float = 2.0) -> object:
        """The JSON of monitoring endpoint `path` (``/jsz``, ``/connz?...``)."""
        return http("GET", f"http://127.0.0.1:{self.monitor}{path}", timeout=timeout).json()

    def client_names(self) -> List[str]:
        """The names of the clients connected to this node (``/connz``)."""
        connz = self.monitoring("/connz?limit=1024")
        assert isinstance(connz, dict)
        return [c.get("name", "") for c in connz.get("connections") or []]

    def __repr__(self) -> str:
        return f"<{self.name} {self.url}>"


def wait_for_meta_leader(nodes: List[NatsNode], timeout: float = 30.0) -> str:
    """Waits until every node is healthy (``/healthz``) and all name the same JetStream
    meta leader (``/jsz``); returns its name."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            leaders = set()
            for node in nodes:
                if node.proc.popen.poll() is not None:
                    raise RuntimeError(f"{node.name} exited:\n{node.proc.output()[-3000:]}")
                health = http("GET", f"http://127.0.0.1:{node.monitor}/healthz", timeout=2)
                jsz = node.monitoring("/jsz")
                assert isinstance(jsz, dict)
                leaders.add((jsz.get("meta_cluster") or {}).get("leader"))
                last = (node.name, health.status, leaders)
                if health.status != 200:
                    break
            else:
                if len(leaders) == 1 and None not in leaders and "" not in leaders:
                    return str(leaders.pop())
        except (OSError, ValueError) as err:
            last = err
        time.sleep(0.1)
    raise TimeoutError(f"no JetStream meta leader agreed on: {last}")


class Cluster:
    """Processes of one test, stopped in reverse start order."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: List[Proc] = []
        #: The nats-server `nats()` started last.
        self.nats_proc: Optional[Proc] = None

    def start(self, args: List[str], name: str, env: Optional[Dict[str, str]] = None) -> Proc:
        proc = Proc(args, self.tmp / f"{name}.log", env)
        self.procs.append(proc)
        return proc

    def nats(
        self,
        port: Optional[int] = None,
        *,
        max_payload: str = "8MB",
        max_memory_store: Optional[str] = None,
        store: Optional[Path] = None,
    ) -> str:
        """A real nats-server with JetStream, on a free loopback port, or on `port` with an
        empty store (what a restarted server with memory storage holds) unless `store`
        names the one an earlier server kept. `max_payload` is its message limit;
        `max_memory_store` caps what JetStream keeps in memory."""
        port = port or free_port()
        runs = sum(1 for p in self.procs if p.log.name.startswith("nats"))
        name = f"nats-{runs}" if runs else "nats"
        store = store or (self.tmp / f"js-{runs}" if runs else self.tmp / "js")
        conf = self.tmp / f"{name}.conf"
        memory = f"\n  max_memory_store: {max_memory_store}" if max_memory_store else ""
        conf.write_text(
            f'listen: "127.0.0.1:{port}"\nmax_payload: {max_payload}\n'
            f'jetstream {{\n  store_dir: "{store}"{memory}\n}}\n'
        )
        self.nats_proc = self.start([find("nats-server"), "-c", str(conf)], name)
        wait_for_port(port)
        return f"nats://127.0.0.1:{port}"

    def nats_cluster(self, size: int = 3, *, max_payload: str = "8MB") -> List[NatsNode]:
        """`size` real nats-servers clustered on loopback (JetStream on, each with its own
        `server_name`, store in the test's temp dir, ephemeral client, cluster and
        monitoring ports), returned once every node is healthy and they agree on a
        JetStream meta leader."""
        ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
        routes = ", ".join(f'"nats-route://127.0.0.1:{route}"' for _, route, _ in ports)
        nodes = []
        for i, (client, route, monitor) in enumerate(ports, start=1):
            name = f"nats-{i}"
            conf = self.tmp / f"{name}.conf"
            conf.write_text(
                f'server_name: "{name}"\nlisten: "127.0.0.1:{client}"\n'
                f'http: "127.0.0.1:{monitor}"\nmax_payload: {max_payload}\n'
                f'jetstream {{\n  store_dir: "{self.tmp / ("js-" + name)}"\n}}\n'
                f'cluster {{\n  name: "natserve"\n  listen: "127.0.0.1:{route}"\n'
                f"  routes: [{routes}]\n}}\n"
            )
            proc = self.start([find("nats-server"), "-c", str(conf)], name)
            nodes.append(NatsNode(name, f"nats://127.0.0.1:{client}", monitor, proc))
        wait_for_meta_leader(nodes)
        return nodes

    def app(
        self, script: Path, *flags: str, name: str = "app", env: Optional[Dict[str, str]] = None
    ) -> Proc:
        return self.start([sys.executable, str(script), *flags], name, env)

    def ingress(self, script: Path, nats: str, *flags: str, name: str = "ingress") -> str:
        """``script`` as ``--role ingress`` on a free port of ``nats``; its URL once ready."""
        port = free_port()
        proc = self.app(
            script,
            "--role", "ingress", "--nats", nats,
            "--port", str(port), "--address", "127.0.0.1",
            *flags,
            name=name,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        return base

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def wait_ready(base: str, proc: Optional[Proc] = None, timeout: float = 60.0) -> None:
    """Waits until the ingress says every stage has a ready worker."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"process exited early:\n{proc.output()[-4000:]}")
        try:
            last = http("GET", base + "/", timeout=2)
            if isinstance(last, Response) and last.status == 200:
                return
        except OSError as err:
            last = err
        time.sleep(0.1)
    logs = proc.output()[-4000:] if proc else ""
    raise TimeoutError(f"{base} not ready: {last}\n{logs}")


def started_app(
    tmp: Path, script: Path, *flags: str, env: Optional[Dict[str, str]] = None
) -> Tuple[Cluster, str, Proc]:
    """Starts `script` with its own nats-server (no --nats), ready to serve."""
    c = Cluster(tmp)
    port = free_port()
    proc = c.app(script, "--port", str(port), "--address", "127.0.0.1", *flags, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
    except Exception:
        c.stop_all()
        raise
    return c, base, proc


def descendants(pid: int) -> List[int]:
    """All live processes below `pid`, read from /proc."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: List[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def descendant_named(pid: int, name: str) -> int:
    """The one live process below `pid` running executable `name`."""
    found = []
    for child in descendants(pid):
        try:
            if Path(f"/proc/{child}/exe").resolve().name == name and alive(child):
                found.append(child)
        except OSError:
            continue
    if len(found) != 1:
        raise LookupError(f"{len(found)} processes named {name} below {pid}")
    return found[0]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
