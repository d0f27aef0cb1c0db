"""The launcher: what `Server.run()` is in the process a user starts.

It starts, as ``--role`` asks, a local nats-server (unless ``--nats`` is given), the agent
(with a config naming the stages it hosts) and the ingress, each in its own session and
tied to the launcher's life. It then waits. On SIGINT/SIGTERM it stops them in a fixed
order — ingress, agent, nats-server — and exits 0. Each child gets SIGTERM and is killed
only after its own drain budget (`kill_deadlines`) has passed. If a child exits on its own
it logs that with its exit code, stops the rest in the same order and exits 1.
"""

from __future__ import annotations

import logging
import multiprocessing.process
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._agent_config import (
    StageSelectionError,
    UnimportableWorkerError,
    agent_config,
    check_importable,
    select_stages,
    worker_command,
    write_agent_config,
)
from ._binaries import AGENT, INGRESS, BinaryNotFoundError, find
from ._dry_run import dry_run
from ._logging import configure
from ._nats_options import has_secret, redact
from ._nats_server import LocalNatsServer, NatsServerError
from ._processes import Child
from ._settings import Settings, check_script_flags, fail, mosec_flag_notices, parse_settings
from ._stage import StageSpec

#: A process the user asked `Server.register_daemon` to watch.
Daemon = Union["subprocess.Popen[bytes]", multiprocessing.process.BaseProcess]

logger = logging.getLogger("natserve.launcher")

POLL_INTERVAL_S = 0.1
#: How often the launcher asks its ingress whether it is ready yet, until it is: a
#: refused connect (the port opens when ready) costs nothing, so often.
READY_PROBE_EVERY_S = 0.05
#: How long one such probe may take.
READY_PROBE_TIMEOUT_S = 1.0
#: The agent's supervisor gives each worker process this long from SIGTERM to SIGKILL
#: (worker-agent/src/supervisor.rs, TERM_GRACE), all workers at once, after the drain.
WORKER_STOP_S = 5.0
#: Beyond a child's own budget: flushing NATS and exiting take well under a second on a
#: healthy host. Kept small because whatever runs the launcher has its own deadline
#: (docker-compose.yml gives the worker container 40 s, the agent's default budget is
#: 30 s + 5 s for its workers).
KILL_MARGIN_S = 3.0


def kill_deadlines(settings: Settings) -> Tuple[float, float]:
    """Seconds from SIGTERM to SIGKILL for the ingress and for the agent.

    Each is the child's own drain budget plus a margin, so the launcher never cuts short
    a drain the child was told it may take: the ingress answers its in-flight requests
    for up to ``--ingress-grace-ms``; the agent lets running batches finish for up to
    ``--agent-grace-ms``, then stops its workers.
    """
    ingress = settings.ingress_grace_ms / 1000 + KILL_MARGIN_S
    agent = settings.agent_grace_ms / 1000 + WORKER_STOP_S + KILL_MARGIN_S
    return ingress, agent


def rust_log_level(level: str) -> str:
    """The Rust binaries' spelling (tracing's EnvFilter reads "warning" as a target name)."""
    return "warn" if level == "warning" else level


def nats_env(settings: Settings, nats_url: str) -> Dict[str, str]:
    """The environment of the agent and the ingress: the launcher's, plus how to reach
    NATS. The URL may carry a password, so it goes in the environment (readable only by
    the same user), never on a command line (visible to every user in ``ps``)."""
    env = dict(os.environ)
    env.update(settings.nats_security.env())
    env["NATSERVE_NATS"] = nats_url
    return env


def agent_argv(binary: str, settings: Settings, config: Path) -> List[str]:
    argv = [
        binary,
        "--namespace", settings.namespace,
        "--config", str(config),
        "--log-level", rust_log_level(settings.log_level),
        "--max-queue", str(settings.max_queue),
        "--storage", settings.storage,
        "--replicas", str(settings.replicas),
        "--prefetch", settings.prefetch,
        "--heartbeat-ms", str(settings.heartbeat_ms),
        "--agent-grace-ms", str(settings.agent_grace_ms),
        "--log-format", settings.log_format,
    ]  # fmt: skip
    # Unset means the agent's own behaviour: no metrics server, a fresh temp directory.
    if settings.metrics_address is not None:
        argv += ["--metrics-address", settings.metrics_address]
    if settings.socket_dir is not None:
        argv += ["--socket-dir", settings.socket_dir]
    return argv


def ingress_argv(binary: str, settings: Settings) -> List[str]:
    argv = [
        binary,
        "--namespace", settings.namespace,
        "--address", settings.address,
        "--port", str(settings.port),
        "--timeout", str(settings.timeout),
        "--max-body-size", str(settings.max_body_size),
        "--log-level", rust_log_level(settings.log_level),
        "--ingress-grace-ms", str(settings.ingress_grace_ms),
        "--max-connections", str(settings.max_connections),
        "--header-read-timeout-ms", str(settings.header_read_timeout_ms),
        "--result-ttl-s", str(settings.result_ttl_s),
        "--async-timeout-ms", str(settings.async_timeout_ms),
        "--log-format", settings.log_format,
        "--replicas", str(settings.replicas),
    ]  # fmt: skip
    # Started with its agent, the ingress opens its port only once every stage has a
    # ready worker (Mosec's behaviour); alone, it answers 503 until then, which a load
    # balancer's readiness probe expects.
    if settings.role == "all":
        argv += ["--listen-when-ready", "true"]
    return argv


class _Stop:
    """Records the first SIGINT/SIGTERM; the main loop notices it between polls."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __call__(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is None:
            self.signum = signum
        else:
            logger.info("already stopping (signal %d)", signum)

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


def _daemon_exit(proc: Daemon) -> Optional[int]:
    if isinstance(proc, subprocess.Popen):
        return proc.poll()
    return proc.exitcode


class _ReadyLine:
    """Says ``natserve ready on http://ADDR:PORT (routes: ...)`` once, at the first poll
    that finds the ingress's ``GET /`` answering 200 — the moment it is true, not when
    the port opened."""

    def __init__(self, settings: Settings, routes: Sequence[str]) -> None:
        host = "127.0.0.1" if settings.address in ("0.0.0.0", "::", "") else settings.address
        host = f"[{host}]" if ":" in host else host
        self._probe = f"http://{host}:{settings.port}/"
        self._shown = f"http://{settings.address}:{settings.port}"
        self._routes = ", ".join(routes)
        self._next = 0.0
        self.done = False

    def poll(self) -> None:
        now = time.monotonic()
        if self.done or now < self._next:
            return
        self._next = now + READY_PROBE_EVERY_S
        try:
            # Always http:// to our own ingress, built above.
            with urllib.request.urlopen(self._probe, timeout=READY_PROBE_TIMEOUT_S) as resp:  # noqa: S310
                ready = resp.status == 200
        except (OSError, ValueError):
            ready = False
        if ready:
            self.done = True
            logger.info("natserve ready on %s (routes: %s)", self._shown, self._routes)


def _supervise(
    children: Sequence[Child],
    stop: _Stop,
    daemons: Mapping[str, Daemon] = {},
    ready: Optional[_ReadyLine] = None,
) -> int:
    """Waits for a stop signal (0) or a child's or a user daemon's unexpected exit (1)."""
    while stop.signum is None:
        if ready is not None:
            ready.poll()
        for child in children:
            code = child.poll()
            if code is not None:
                logger.error("%s exited unexpectedly with exit code %d", child.name, code)
                return 1
        for name, proc in daemons.items():
            code = _daemon_exit(proc)
            if code is not None:
                logger.error("daemon %s exited with exit code %d; stopping", name, code)
                return 1
        time.sleep(POLL_INTERVAL_S)
    logger.info("received %s; shutting down", signal.Signals(stop.signum).name)
    return 0


def main(
    routes: Mapping[str, Sequence[StageSpec]],
    argv: Sequence[str],
    *,
    daemons: Mapping[str, Daemon] = {},
) -> int:
    """Runs the launcher until a signal or a child's exit; returns the exit code."""
    settings, rest = parse_settings(argv)
    check_script_flags(rest)
    configure(settings.log_level, log_format=settings.log_format)
    for notice in mosec_flag_notices(settings):
        logger.warning("%s", notice)
    if settings.dry_run:
        return dry_run(routes)
    if settings.role != "all" and settings.nats is None:
        # A private nats-server would leave this process alone in its own cluster.
        fail("--nats", f"--role {settings.role} joins a cluster: give its NATS URL")
    problem = settings.nats_security.problem(settings.nats)
    if problem is not None:
        fail(*problem)
    on_command_line = any(a == "--nats" or a.startswith("--nats=") for a in argv)
    if on_command_line and settings.nats and has_secret(settings.nats):
        logger.warning(
            "--nats %s carries a secret on the command line, visible to every user in ps: "
            "set NATSERVE_NATS instead",
            redact(settings.nats),
        )
    stages: List[StageSpec] = []
    if settings.runs_agent:
        try:
            stages = select_stages(routes, settings.stages)
        except StageSelectionError as err:
            fail("--stages", str(err))
        try:
            check_importable(stages)
        except UnimportableWorkerError as err:
            logger.error("%s", err)
            return 1
    try:
        agent_bin = find(AGENT) if settings.runs_agent else ""
        ingress_bin = find(INGRESS) if settings.runs_ingress else ""
    except BinaryNotFoundError as err:
        logger.error("%s", err)
        return 1

    ingress_kill_s, agent_kill_s = kill_deadlines(settings)
    stop = _Stop()
    stop.install()
    # Stop order: ingress first (no new requests), then the agent (finish batches), then
    # the nats-server everything talks through.
    children: List[Child] = []
    with tempfile.TemporaryDirectory(prefix="natserve-") as tmp:
        workdir = Path(tmp)
        nats: Optional[LocalNatsServer] = None
        try:
            nats_url = settings.nats
            if nats_url is None:
                nats = LocalNatsServer(workdir)
                nats_url = nats.start()
                logger.info("local nats-server listening on %s", nats_url)
            if settings.runs_agent:
                config = write_agent_config(
                    workdir / "agent.json", agent_config(routes, stages, worker_command())
                )
                hosted = ", ".join(f"{s.route}:{s.index} {s.name}" for s in stages)
                logger.info("agent hosts %s", hosted)
                agent = Child(
                    "natserve-agent",
                    agent_argv(agent_bin, settings, config),
                    grace=agent_kill_s,
                    env=nats_env(settings, nats_url),
                )
                children.insert(0, agent)
            if settings.runs_ingress:
                ingress = Child(
                    "natserve-ingress",
                    ingress_argv(ingress_bin, settings),
                    grace=ingress_kill_s,
                    env=nats_env(settings, nats_url),
                )
                children.insert(0, ingress)
                if settings.role == "all":
                    logger.info(
                        "http://%s:%d opens once every stage has a ready worker",
                        settings.address,
                        settings.port,
                    )
                else:
                    logger.info("serving http://%s:%d", settings.address, settings.port)
            watched = children + ([nats.child] if nats and nats.child else [])
            ready = _ReadyLine(settings, list(routes)) if settings.runs_ingress else None
            code = _supervise(watched, stop, daemons, ready)
        except (NatsServerError, OSError) as err:
            logger.error("cannot start: %s", err)
            code = 1
        finally:
            for child in children:
                child.stop()
            if nats is not None:
                nats.stop()
    logger.info("stopped")
    return code
