"""`Server`: collects the routes and their stages, then runs the launcher.

``append_worker`` validates every argument up front (`natserve._stage`), so a mistake
shows in the launcher, not later in a worker process on another host. Worker processes
never run ``append_worker`` again: they get their stage from the agent (`natserve._worker`).
"""

from __future__ import annotations

import multiprocessing.process
import subprocess
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

from . import _worker
from ._launcher import Daemon
from ._launcher import main as launcher_main
from ._runtime import Runtime
from ._stage import StageSpec, check_route
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
        self._daemons: Dict[str, Daemon] = {}
        # Each Runtime's first stage, its home: a Runtime on several routes is one stage.
        self._homes: Dict[int, Tuple[Runtime, StageSpec]] = {}

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
        timeout: float = 0,
        route: Union[str, Sequence[str]] = "/inference",
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
            timeout: seconds (as in Mosec; int or float, >= 0) a batch may run in
                ``forward`` before its worker is replaced and its items answered 504;
                0 leaves only the request's own deadline (``--timeout``, ms).
            route: the HTTP path, like ``/inference`` or ``/v1/embed``, or a list of
                paths: as in Mosec, the routes share this one stage (one queue, ``num``
                processes, batches mixing the routes' requests), and each request goes
                on along its own route.
        """
        runtime = Runtime._checked(
            "append_worker",
            worker,
            num=num,
            max_batch_size=max_batch_size,
            max_wait_time=max_wait_time,
            timeout=timeout,
            start_method=start_method,
            env=env,
        )
        for path in self._check_routes(route):
            self._add(path, runtime)

    def register_runtime(self, routes: Mapping[str, Sequence[Runtime]]) -> None:
        """Mosec's: ``{"/route": [runtime, ...], ...}``, each list a pipeline in order.

        Only on a server without workers yet, as in Mosec. A runtime named on several
        routes is one stage shared by them: one queue and ``num`` processes, batches that
        mix the routes' requests, each request going on along its own route.
        """
        where = "register_runtime"
        if self._routes:
            raise RuntimeError(
                f"{where}: the server already has routes {sorted(self._routes)}; call "
                "register_runtime on an empty Server, or use append_worker throughout"
            )
        if not isinstance(routes, Mapping) or not routes:
            raise TypeError(
                f"{where}: routes must be a non-empty dict of route to a list of Runtime, "
                f"got {routes!r}"
            )
        known: List[str] = []
        for path, runtimes in routes.items():
            check_route(path, known, where=where)
            known.append(path)
            if isinstance(runtimes, (str, bytes)) or not isinstance(runtimes, Sequence):
                raise TypeError(
                    f"{where}: routes[{path!r}] must be a list of Runtime, got {runtimes!r}"
                )
            if not runtimes:
                raise ValueError(f"{where}: routes[{path!r}] is empty; give it at least one")
            for i, runtime in enumerate(runtimes):
                if not isinstance(runtime, Runtime):
                    raise TypeError(
                        f"{where}: routes[{path!r}][{i}] must be a natserve.Runtime, "
                        f"got {runtime!r}"
                    )
        for path, runtimes in routes.items():
            for runtime in runtimes:
                self._add(path, runtime)

    def register_daemon(
        self,
        name: str,
        proc: Union[subprocess.Popen, multiprocessing.process.BaseProcess],  # type: ignore[type-arg]
    ) -> None:
        """Mosec's: watch a process you started (a cache, a shared-memory store). If it
        exits while the service runs, the launcher stops the service and exits 1."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"register_daemon: name must be a non-empty str, got {name!r}")
        if not isinstance(proc, (subprocess.Popen, multiprocessing.process.BaseProcess)):
            raise TypeError(
                "register_daemon: proc must be a subprocess.Popen or a multiprocessing "
                f"Process, got {type(proc).__name__} {proc!r}"
            )
        self._daemons[name] = proc

    def _check_routes(self, route: Union[str, Sequence[str]]) -> List[str]:
        paths = [route] if isinstance(route, str) else route
        if not isinstance(paths, (list, tuple)) or not paths:
            raise TypeError(
                "append_worker: route must be a path like '/inference' or a non-empty list "
                f"of paths, got {route!r}"
            )
        known = list(self._routes)
        checked: List[str] = []
        for path in paths:
            check_route(path, known)
            if path in checked:
                raise ValueError(f"append_worker: route lists {path!r} twice in {route!r}")
            checked.append(path)
            known.append(path)
        return checked

    def _add(self, route: str, runtime: Runtime) -> None:
        stages = self._routes.setdefault(route, [])
        if stages and stages[-1].streams:
            raise ValueError(
                f"append_worker: {stages[-1].name} is an SSEWorker, so it must be the last "
                f"stage of {route}, but {runtime.worker.__name__} would follow it; append "
                f"{runtime.worker.__name__} before it"
            )
        home = self._homes.get(id(runtime))
        stage = StageSpec(
            route=route,
            index=len(stages),
            worker=runtime.worker,
            num=runtime.num,
            max_batch_size=runtime.max_batch_size,
            max_wait_time=runtime.max_wait_time,
            timeout=runtime.timeout,
            env=runtime.env,
            start_method=runtime.start_method,
            queue=None if home is None else home[1].home,
        )
        if home is None:
            self._homes[id(runtime)] = (runtime, stage)
        stages.append(stage)

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
        raise SystemExit(launcher_main(self.routes, sys.argv[1:], daemons=self._daemons))
