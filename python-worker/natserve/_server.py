"""`Server`: collects the routes and their stages, then runs the launcher.

``append_worker`` validates every argument up front (`natserve._stage`), so a mistake
shows in the launcher, not later in a worker process on another host. Worker processes
never run ``append_worker`` again: they get their stage from the agent (`natserve._worker`).
"""

from __future__ import annotations

import sys
from typing import Dict, List, Mapping, Optional, Sequence, Type

from . import _worker
from ._launcher import main as launcher_main
from ._stage import (
    StageSpec,
    check_env,
    check_int,
    check_route,
    check_start_method,
    check_worker,
)
from ._worker_base import Worker

# StageSpec is re-exported: `Server.routes` hands it out.
__all__ = ["Server", "StageSpec"]


class Server:
    """A natserve service: routes, each a pipeline of `Worker` stages.

    ``python app.py`` with ``Server().run()`` at the end launches everything on this
    machine (nats-server, agent, ingress); ``--role``, ``--nats`` and ``--stages`` split
    the same program across hosts. See ``python app.py --help``.
    """

    def __init__(self) -> None:
        self._routes: Dict[str, List[StageSpec]] = {}

    @property
    def routes(self) -> Mapping[str, Sequence[StageSpec]]:
        """Each route and its stages, in order."""
        return {route: tuple(stages) for route, stages in self._routes.items()}

    def append_worker(
        self,
        worker: Type[Worker],
        num: int = 1,
        max_batch_size: int = 1,
        max_wait_time: int = 0,
        start_method: str = "spawn",
        env: Optional[List[Dict[str, str]]] = None,
        timeout: int = 0,
        route: str = "/inference",
    ) -> None:
        """Appends a stage to ``route``; calls on one route build its pipeline in order.

        Args:
            worker: a `Worker` subclass (the class, not an instance).
            num: worker processes for this stage on each agent that hosts it, >= 1.
            max_batch_size: largest batch `forward` gets, >= 1; above 1 it gets lists.
            max_wait_time: ms to wait for a batch to fill after its first item, >= 0.
            start_method: "spawn" or "fork", accepted for Mosec compatibility; worker
                processes are always fresh interpreters started by the agent.
            env: None, or one dict of extra environment variables per worker process.
            timeout: ms a batch may run in ``forward`` before it is abandoned, >= 0;
                0 leaves only the request's own deadline.
            route: the HTTP path, like ``/inference`` or ``/v1/embed``.
        """
        check_worker(worker)
        check_int("num", num, 1, ">= 1")
        check_int("max_batch_size", max_batch_size, 1, ">= 1")
        check_int("max_wait_time", max_wait_time, 0, ">= 0 (milliseconds)")
        check_int("timeout", timeout, 0, ">= 0 (milliseconds)")
        check_start_method(start_method)
        checked_env = check_env(env, num)
        check_route(route, list(self._routes))
        stages = self._routes.setdefault(route, [])
        stages.append(
            StageSpec(
                route=route,
                index=len(stages),
                worker=worker,
                num=num,
                max_batch_size=max_batch_size,
                max_wait_time=max_wait_time,
                timeout=timeout,
                env=checked_env,
                start_method=start_method,
            )
        )

    def run(self) -> None:
        """Launches this program's part of the service and exits the process when done.

        In a worker process, while the agent's worker entry point imports this program,
        it returns at once and does nothing: a script without an
        ``if __name__ == "__main__":`` guard must not launch a service from each worker.
        """
        if _worker.importing_script():
            return
        if not self._routes:
            raise RuntimeError("Server.run: no workers; call append_worker(...) first")
        raise SystemExit(launcher_main(self.routes, sys.argv[1:]))
