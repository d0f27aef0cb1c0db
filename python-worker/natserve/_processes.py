"""Child processes of the launcher: started in their own session, tied to its life.

Each child gets ``start_new_session=True`` so a terminal's Ctrl-C reaches only the
launcher, which then stops the children in order; on Linux each also gets
``PR_SET_PDEATHSIG = SIGTERM`` so it never outlives a launcher that was killed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from typing import IO, Any, Callable, Optional, Sequence, Union

logger = logging.getLogger("natserve.launcher")

_PR_SET_PDEATHSIG = 1


def _death_signal_setup() -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when the launcher dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return setup


class Child:
    """One named child process (nats-server, agent or ingress)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        grace: float,
        stdout: Union[int, IO[Any], None] = None,
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.name = name
        self.grace = grace
        logger.debug("starting %s: %s", name, " ".join(argv))
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            start_new_session=True,
            preexec_fn=_death_signal_setup(),  # the launcher is single-threaded
            env=env,
        )
        logger.info("started %s (pid %d)", name, self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def stop(self) -> Optional[int]:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit code."""
        code = self.proc.poll()
        if code is not None:
            return code
        logger.info("stopping %s (pid %d)", self.name, self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", self.name, self.grace)
            self.proc.kill()
            code = self.proc.wait()
        logger.info("%s stopped (exit code %s)", self.name, code)
        return code


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Polls ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
