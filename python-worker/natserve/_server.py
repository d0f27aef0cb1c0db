"""`Server`: collects the routes and their stages, then runs as launcher or worker.

``append_worker`` validates every argument up front and says what would be right, so a
mistake shows in the launcher, not later in a worker process on another host.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type

from ._names import ROUTE_PATTERN, is_route, route_slug
from ._worker_base import Worker

_START_METHODS = ("spawn", "fork")


@dataclass(frozen=True)
class StageSpec:
    """One stage of one route, as `Server.append_worker` recorded it."""

    route: str
    index: int
    worker: Type[Worker]
    num: int
    max_batch_size: int
    max_wait_time: int  # ms
    timeout: int  # ms, 0: only the request's deadline applies
    env: Optional[List[Dict[str, str]]]
    start_method: str

    @property
    def name(self) -> str:
        return self.worker.__name__

    @property
    def mime(self) -> str:
        return self.worker.resp_mime_type


def _check_int(name: str, value: Any, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"append_worker: {name} must be an int {meaning}, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"append_worker: {name} must be an int {meaning}, got {value!r}")
    return value


def _check_env(env: Any, num: int) -> Optional[List[Dict[str, str]]]:
    if env is None:
        return None
    wanted = f"None or a list of exactly num={num} dicts of str to str, one per worker process"
    if not isinstance(env, (list, tuple)):
        raise TypeError(f"append_worker: env must be {wanted}, got {type(env).__name__} {env!r}")
    if len(env) != num:
        raise ValueError(f"append_worker: env must be {wanted}, got a list of {len(env)}")
    checked: List[Dict[str, str]] = []
    for i, item in enumerate(env):
        if not isinstance(item, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in item.items()
        ):
            raise TypeError(f"append_worker: env[{i}] must be a dict of str to str, got {item!r}")
        checked.append(dict(item))
    return checked


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
        if not (inspect.isclass(worker) and issubclass(worker, Worker)):
            raise TypeError(
                f"append_worker: worker must be a subclass of natserve.Worker, got {worker!r}"
            )
        if inspect.isabstract(worker):
            raise TypeError(
                f"append_worker: worker {worker.__name__} must implement forward(self, data)"
            )
        _check_int("num", num, 1, ">= 1")
        _check_int("max_batch_size", max_batch_size, 1, ">= 1")
        _check_int("max_wait_time", max_wait_time, 0, ">= 0 (milliseconds)")
        _check_int("timeout", timeout, 0, ">= 0 (milliseconds)")
        if start_method not in _START_METHODS:
            raise ValueError(
                f"append_worker: start_method must be 'spawn' or 'fork', got {start_method!r}"
            )
        checked_env = _check_env(env, num)
        if not isinstance(route, str) or not is_route(route):
            raise ValueError(
                f"append_worker: route must match {ROUTE_PATTERN} (like '/inference' or "
                f"'/v1/embed'), got {route!r}"
            )
        slug = route_slug(route)
        for other in self._routes:
            if other != route and route_slug(other) == slug:
                raise ValueError(
                    f"append_worker: route {route!r} and route {other!r} both have the "
                    f"slug {slug!r} that names their NATS subjects; rename one of them"
                )
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
        """Runs this program's part of the service and exits the process when done.

        Inside a worker process started by an agent (``NATSERVE_SOCKET`` is set) this
        becomes that one worker; otherwise it is the launcher.
        """
        if not self._routes:
            raise RuntimeError("Server.run: no workers; call append_worker(...) first")
        if os.environ.get("NATSERVE_SOCKET"):
            from ._worker import main as worker_main

            code = worker_main(self.routes, sys.argv[1:])
        else:
            from ._launcher import main as launcher_main

            code = launcher_main(self.routes, sys.argv[1:])
        raise SystemExit(code)
