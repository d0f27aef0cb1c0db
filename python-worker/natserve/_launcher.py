"""The launcher: what `Server.run()` is in the process a user starts.

It starts, as ``--role`` asks, a local nats-server (unless ``--nats`` is given), the agent
(with a config naming the stages it hosts) and the ingress, each in its own session and
tied to the launcher's life. It then waits. On SIGINT/SIGTERM it stops them in a fixed
order — ingress (SIGTERM, up to 15 s, then SIGKILL), agent (30 s), nats-server — and exits
0. If a child exits on its own it logs that with its exit code, stops the rest in the same
order and exits 1.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import List, Mapping, Optional, Sequence

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
from ._logging import configure
from ._nats_server import LocalNatsServer, NatsServerError
from ._processes import Child
from ._settings import Settings, fail, parse_settings
from ._stage import StageSpec

logger = logging.getLogger("natserve.launcher")

INGRESS_GRACE_S = 15.0
AGENT_GRACE_S = 30.0
POLL_INTERVAL_S = 0.1


def rust_log_level(level: str) -> str:
    """The Rust binaries' spelling (tracing's EnvFilter reads "warning" as a target name)."""
    return "warn" if level == "warning" else level


def agent_argv(binary: str, settings: Settings, nats_url: str, config: Path) -> List[str]:
    return [
        binary,
        "--nats", nats_url,
        "--namespace", settings.namespace,
        "--config", str(config),
        "--log-level", rust_log_level(settings.log_level),
    ]  # fmt: skip


def ingress_argv(binary: str, settings: Settings, nats_url: str) -> List[str]:
    return [
        binary,
        "--nats", nats_url,
        "--namespace", settings.namespace,
        "--address", settings.address,
        "--port", str(settings.port),
        "--timeout", str(settings.timeout),
        "--max-body-size", str(settings.max_body_size),
        "--log-level", rust_log_level(settings.log_level),
    ]  # fmt: skip


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


def _supervise(children: Sequence[Child], stop: _Stop) -> int:
    """Waits for a stop signal (0) or a child's unexpected exit (1)."""
    while stop.signum is None:
        for child in children:
            code = child.poll()
            if code is not None:
                logger.error("%s exited unexpectedly with exit code %d", child.name, code)
                return 1
        time.sleep(POLL_INTERVAL_S)
    logger.info("received %s; shutting down", signal.Signals(stop.signum).name)
    return 0


def main(routes: Mapping[str, Sequence[StageSpec]], argv: Sequence[str]) -> int:
    """Runs the launcher until a signal or a child's exit; returns the exit code."""
    settings, _ = parse_settings(argv)
    configure(settings.log_level)
    if settings.role != "all" and settings.nats is None:
        # A private nats-server would leave this process alone in its own cluster.
        fail("--nats", f"--role {settings.role} joins a cluster: give its NATS URL")
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
                    agent_argv(agent_bin, settings, nats_url, config),
                    grace=AGENT_GRACE_S,
                )
                children.insert(0, agent)
            if settings.runs_ingress:
                ingress = Child(
                    "natserve-ingress",
                    ingress_argv(ingress_bin, settings, nats_url),
                    grace=INGRESS_GRACE_S,
                )
                children.insert(0, ingress)
                logger.info("serving http://%s:%d", settings.address, settings.port)
            watched = children + ([nats.child] if nats and nats.child else [])
            code = _supervise(watched, stop)
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
