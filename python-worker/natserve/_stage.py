"""The stage record `Server.append_worker` keeps, and the checks of its arguments.

Its own module so that the launcher, the agent config writer and `Server` can all use it
without importing one another in a circle. Every check raises with the argument, the value
and what would be right, so a mistake shows in the launcher, not later in a worker process
on another host.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from ._names import ROUTE_PATTERN, is_route, route_slug
from ._worker_base import SSEWorker, Worker

START_METHODS = ("spawn", "fork")

#: Paths the ingress answers itself; a stage there could never be reached.
RESERVED_ROUTES: Mapping[str, str] = {
    "/": "the ingress's readiness check (GET /)",
    "/metrics": "the ingress's Prometheus metrics (GET /metrics)",
}


@dataclass(frozen=True)
class StageSpec:
    """One stage of one route, as `Server.append_worker` recorded it."""

    route: str
    index: int
    worker: Type[Worker]
    num: int
    max_batch_size: int
    max_wait_time: int  # ms
    timeout: float  # seconds, as Mosec's; 0: only the request's deadline applies
    env: Optional[List[Dict[str, str]]]
    start_method: str
    #: ``(route, index)`` of the stage whose queue serves this one, when one `Runtime` is
    #: on several routes: the first of its places is its home, and the rest share its
    #: queue and processes. None: this stage is its own home.
    queue: Optional[Tuple[str, int]] = None

    @property
    def timeout_ms(self) -> int:
        """``timeout`` in the agent config's unit; a positive value never rounds to 0
        (which would mean no timeout)."""
        return math.ceil(self.timeout * 1000) if self.timeout > 0 else 0

    @property
    def home(self) -> Tuple[str, int]:
        """``(route, index)`` of the stage whose queue serves this one (itself, unshared)."""
        return self.queue if self.queue is not None else (self.route, self.index)

    @property
    def name(self) -> str:
        return self.worker.__name__

    @property
    def mime(self) -> str:
        return self.worker.resp_mime_type

    @property
    def streams(self) -> bool:
        """Whether the stage sends stream events (Mosec's `SSEWorker`)."""
        return issubclass(self.worker, SSEWorker)

    @property
    def worker_ref(self) -> str:
        """Where a worker process finds the class: ``module:qualname``."""
        return f"{self.worker.__module__}:{self.worker.__qualname__}"


def check_worker(worker: Any, *, where: str = "append_worker") -> Type[Worker]:
    if not (inspect.isclass(worker) and issubclass(worker, Worker)):
        raise TypeError(f"{where}: worker must be a subclass of natserve.Worker, got {worker!r}")
    if inspect.isabstract(worker):
        raise TypeError(f"{where}: worker {worker.__name__} must implement forward(self, data)")
    unsupported = getattr(worker, "_natserve_unsupported", None)
    if unsupported:
        raise NotImplementedError(f"{where}: worker {worker.__name__} {unsupported}")
    return worker


#: Longest forward timeout accepted, in seconds: the agent keeps milliseconds in an i64,
#: and a day is already far past any request's deadline.
MAX_TIMEOUT_S = 86_400.0


def check_timeout(value: Any, *, where: str = "append_worker") -> float:
    """Mosec's ``timeout``: seconds, an int or a float, >= 0 (0: no per-batch limit)."""
    meaning = f"a number of seconds >= 0 and <= {MAX_TIMEOUT_S:.0f}, like 0.5 or 3 (0: off)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: timeout must be {meaning}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or value > MAX_TIMEOUT_S:
        raise ValueError(f"{where}: timeout must be {meaning}, got {value!r}")
    return float(value)


def check_int(
    name: str, value: Any, minimum: int, meaning: str, *, where: str = "append_worker"
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{where}: {name} must be an int {meaning}, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{where}: {name} must be an int {meaning}, got {value!r}")
    return value


def check_start_method(start_method: Any, *, where: str = "append_worker") -> str:
    if start_method not in START_METHODS:
        raise ValueError(f"{where}: start_method must be 'spawn' or 'fork', got {start_method!r}")
    return str(start_method)


def check_env(
    env: Any, num: int, *, where: str = "append_worker"
) -> Optional[List[Dict[str, str]]]:
    if env is None:
        return None
    wanted = f"None or a list of exactly num={num} dicts of str to str, one per worker process"
    if not isinstance(env, (list, tuple)):
        raise TypeError(f"{where}: env must be {wanted}, got {type(env).__name__} {env!r}")
    if len(env) != num:
        raise ValueError(f"{where}: env must be {wanted}, got a list of {len(env)}")
    checked: List[Dict[str, str]] = []
    for i, item in enumerate(env):
        if not isinstance(item, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in item.items()
        ):
            raise TypeError(f"{where}: env[{i}] must be a dict of str to str, got {item!r}")
        checked.append(dict(item))
    return checked


def check_route(route: Any, known: Sequence[str], *, where: str = "append_worker") -> str:
    """``route`` if it can be served beside the ``known`` routes of the same server."""
    if isinstance(route, str) and route in RESERVED_ROUTES:
        raise ValueError(
            f"{where}: route {route!r} is {RESERVED_ROUTES[route]} and can never reach "
            "a worker; choose another path, like '/inference' or '/v1/embed'"
        )
    if isinstance(route, str) and (route == "/openapi" or route.startswith("/openapi/")):
        raise ValueError(
            f"{where}: route {route!r} is under /openapi/, where the ingress serves the "
            "OpenAPI document and Swagger UI; choose another path, like '/inference'"
        )
    if isinstance(route, str) and (route == "/results" or route.startswith("/results/")):
        raise ValueError(
            f"{where}: route {route!r} is under /results/, where the ingress serves the "
            "results of asynchronous jobs; choose another path, like '/inference'"
        )
    if not isinstance(route, str) or not is_route(route):
        raise ValueError(
            f"{where}: route must match {ROUTE_PATTERN} (like '/inference' or "
            f"'/v1/embed'), got {route!r}"
        )
    slug = route_slug(route)
    for other in known:
        if other != route and route_slug(other) == slug:
            raise ValueError(
                f"{where}: route {route!r} and route {other!r} both have the "
                f"slug {slug!r} that names their NATS subjects; rename one of them"
            )
    return route
