"""The agent's JSON config (docs/protocol.md, "Agent <-> Python worker"), the command that
starts a worker process, and the ``--stages`` selection of which stages one agent hosts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

from ._openapi import route_types
from ._stage import StageSpec

#: The module `worker_command` runs; see `natserve._worker_main`.
WORKER_ENTRY = "natserve._worker_main"


class StageSelectionError(ValueError):
    """A ``--stages`` entry names no stage of this program."""


class UnimportableWorkerError(TypeError):
    """A stage's class could not be found by a worker process importing the program."""


def check_importable(stages: Sequence[StageSpec]) -> None:
    """Refuses classes a worker process could not find by ``module:qualname``.

    A class defined inside a function exists only while that function runs in the
    launcher; the worker process imports the program and has no way to reach it.
    """
    for stage in stages:
        if "<locals>" in stage.worker.__qualname__:
            raise UnimportableWorkerError(
                f"worker {stage.name} of {stage.route} stage {stage.index} is defined inside "
                f"a function ({stage.worker_ref}), so a worker process cannot import it: "
                "define the class at module level"
            )


def _key(stage: StageSpec) -> str:
    return f"{stage.route}:{stage.index}"


def select_stages(
    routes: Mapping[str, Sequence[StageSpec]], selectors: Optional[Sequence[str]]
) -> List[StageSpec]:
    """The stages ``selectors`` pick, in route then stage order (all when None).

    A selector is a worker class name (every stage that runs that class) or
    ``<route>:<index>`` (one stage). A stage several routes share is hosted at its home
    (its first place), whichever of its places is named; only homes are returned.
    """
    every = [stage for stages in routes.values() for stage in stages]
    if selectors is None:
        return [s for s in every if s.queue is None]
    chosen: Set[str] = set()
    for selector in selectors:
        hits = [s for s in every if selector in (s.name, _key(s))]
        if not hits:
            known = sorted({s.name for s in every}) + [_key(s) for s in every]
            raise StageSelectionError(f"unknown stage {selector!r} (known: {', '.join(known)})")
        chosen.update(f"{s.home[0]}:{s.home[1]}" for s in hits)
    return [s for s in every if s.queue is None and _key(s) in chosen]


def worker_command() -> List[str]:
    """How the agent starts a worker process of this program: natserve's worker entry
    point, given this program's script and arguments to import it the way spawn does."""
    return [sys.executable, "-m", WORKER_ENTRY, os.path.abspath(sys.argv[0]), *sys.argv[1:]]


def agent_config(
    routes: Mapping[str, Sequence[StageSpec]],
    stages: Sequence[StageSpec],
    worker_cmd: Sequence[str],
) -> Dict[str, Any]:
    """The config document: every route (for registration) and the hosted stages."""
    return {
        "worker_cmd": list(worker_cmd),
        "routes": [
            {
                "route": route,
                "names": [s.name for s in route_stages],
                "types": route_types(route_stages),
                "streams": route_stages[-1].streams,
                **_queues(route_stages),
            }
            for route, route_stages in routes.items()
        ],
        "stages": [
            {
                "route": s.route,
                "stage": s.index,
                "name": s.name,
                "worker": s.worker_ref,
                "num": s.num,
                "max_batch_size": s.max_batch_size,
                "max_wait_ms": s.max_wait_time,
                "timeout_ms": s.timeout_ms,
                "env": None if s.env is None else [dict(e) for e in s.env],
                "mime": s.mime,
            }
            for s in stages
        ],
    }


def _queues(route_stages: Sequence[StageSpec]) -> Dict[str, Any]:
    """A route's ``queues``: each stage's home, written only where one is shared."""
    if all(s.queue is None for s in route_stages):
        return {}
    return {"queues": [{"route": s.home[0], "stage": s.home[1]} for s in route_stages]}


def write_agent_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path
