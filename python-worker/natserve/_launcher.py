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
import os
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Dict, List, Mapping, Optional, Sequence

from ._agent_config import (
    StageSelectionError,
    agent_config,
    select_stages,
    worker_command,
    write_agent_config,
)
from ._binaries import AGENT, INGRESS, BinaryNotFoundError, find
from ._logging import configure
from ._nats_options import has_secret, redact
from ._nats_server import LocalNatsServer, NatsServerError
from ._processes import Child
from ._server import StageSpec
from ._settings import Settings, fail, parse_settings

logger = logging.getLogger("natserve.launcher")

INGRESS_GRACE_S = 15.0
AGENT_GRACE_S = 30.0
POLL_INTERVAL_S = 0.1


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
    return [
        binary,
        "--namespace", settings.namespace,
        "--config", str(config),
        "--log-level", rust_log_level(settings.log_level),
    ]  # fmt: skip


def ingress_argv(binary: str, settings: Settings) -> List[str]:
    return [
        binary,
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
                    agent_argv(agent_bin, settings, config),
                    grace=AGENT_GRACE_S,
                    env=nats_env(settings, nats_url),
                )
                children.insert(0, agent)
            if settings.runs_ingress:
                ingress = Child(
                    "natserve-ingress",
                    ingress_argv(ingress_bin, settings),
                    grace=INGRESS_GRACE_S,
                    env=nats_env(settings, nats_url),
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
