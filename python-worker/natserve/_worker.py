"""The worker-process loop: what `Server.run()` becomes inside a process an agent started.

The agent sets ``NATSERVE_WORKER_ROUTE``, ``NATSERVE_WORKER_STAGE``,
``NATSERVE_WORKER_ID`` and ``NATSERVE_SOCKET`` and re-runs the user's program. This
process then connects to the socket, builds its `Worker` (``worker_id``, ``stage`` and
``max_batch_size`` set before ``__init__``), warms it up, sends READY with its pid and
answers every BATCH with one RESULTS frame of the same id (see `natserve._batch` for how
items fail independently). It exits 0 when the agent closes the socket, and non-zero
when the worker cannot start or the agent breaks the protocol; the agent restarts it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, List, Mapping, Optional, Sequence, Type

from ._batch import BatchRunner
from ._logging import configure
from ._protocol import DEFAULT_MAX_FRAME, Batch, Connection, FrameError, Ready, Results
from ._server import StageSpec
from ._settings import parse_settings
from ._worker_base import Worker

logger = logging.getLogger("natserve.worker")


def build_worker(cls: Type[Worker], *, worker_id: int, stage: int, max_batch_size: int) -> Worker:
    """Creates the user's worker with its identity set before its ``__init__`` runs."""
    worker = cls.__new__(cls)
    worker.worker_id = worker_id
    worker.stage = stage
    worker.max_batch_size = max_batch_size
    cls.__init__(worker)
    return worker


def warm_up(worker: Worker) -> int:
    """Runs ``forward`` on ``example`` (or each of ``multi_examples``); returns the count.

    A batching stage gets each example as a batch of ``max_batch_size`` copies so the
    largest shape is exercised. Any exception propagates: a worker that cannot run its
    own example is not ready.
    """
    examples: List[Any] = (
        [worker.example] if worker.example is not None else list(worker.multi_examples or [])
    )
    for example in examples:
        if worker.max_batch_size > 1:
            batch = [example] * worker.max_batch_size
            outputs = worker.forward(batch)
            if not isinstance(outputs, (list, tuple)) or len(outputs) != len(batch):
                raise TypeError(
                    f"warm-up: forward must return a list of {len(batch)} results for a "
                    f"batch of {len(batch)}, got {type(outputs).__name__}"
                )
        else:
            worker.forward(example)
    return len(examples)


def serve(
    sock: socket.socket,
    stages: Sequence[StageSpec],
    stage: int,
    worker_id: int,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> int:
    """Serves one stage over a connected socket until the agent closes it; the exit code."""
    spec = stages[stage]
    conn = Connection(sock, max_frame)
    try:
        return _serve(conn, spec, stage == len(stages) - 1, worker_id)
    finally:
        conn.close()


def _serve(conn: Connection, spec: StageSpec, last: bool, worker_id: int) -> int:
    try:
        worker = build_worker(
            spec.worker,
            worker_id=worker_id,
            stage=spec.index,
            max_batch_size=spec.max_batch_size,
        )
        warmed = warm_up(worker)
    except Exception:
        logger.exception(
            "worker %s failed to start; check its __init__ and that its example matches "
            "what forward expects",
            spec.name,
        )
        return 1
    runner = BatchRunner(worker, first=spec.index == 0, last=last)
    try:
        conn.write_frame(Ready(pid=os.getpid()))
        logger.info("worker %s ready (pid %d, %d warm-up examples)", spec.name, os.getpid(), warmed)
        while True:
            frame = conn.read_frame()
            if frame is None:
                logger.debug("agent closed the socket; exiting")
                return 0
            if not isinstance(frame, Batch):
                logger.error("agent sent an unexpected %s frame; exiting", type(frame).__name__)
                return 1
            conn.write_frame(Results(id=frame.id, items=runner.run(frame.items)))
    except FrameError as err:
        logger.error("bad frame from the agent: %s; exiting", err)
        return 1
    except OSError as err:
        logger.error("socket to the agent failed: %s; exiting", err)
        return 1


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def main(
    routes: Mapping[str, Sequence[StageSpec]],
    argv: Sequence[str],
    env: Optional[Mapping[str, str]] = None,
) -> int:
    """Entry point of a worker process, configured by the agent's environment."""
    env = os.environ if env is None else env
    settings, _ = parse_settings(argv, env)
    try:
        spec = json.loads(env.get("NATSERVE_WORKER_SPEC", ""))
        route, stage = str(spec["route"]), int(spec["stage"])
    except (ValueError, KeyError, TypeError):
        route, stage = "", None
    worker_id = _env_int(env, "NATSERVE_WORKER_ID")
    path = env.get("NATSERVE_SOCKET", "")
    configure(settings.log_level, prefix=f"[{route}:{stage} #{worker_id}]")
    stages = routes.get(route)
    if stages is None or stage is None or not 0 <= stage < len(stages) or worker_id is None:
        logger.error(
            "this program has no stage %r of route %r (worker id %r); the agent and the "
            "program it runs disagree: known routes %s",
            stage,
            route,
            env.get("NATSERVE_WORKER_ID"),
            {r: len(s) for r, s in routes.items()},
        )
        return 1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as err:
        logger.error("cannot connect to the agent's socket %s: %s", path, err)
        sock.close()
        return 1
    return serve(sock, stages, stage, worker_id)
