"""A stand-in agent: drives the worker loop over socketpair() like the Rust agent does."""

from __future__ import annotations

import json
import socket
import threading
from typing import List, Optional, Sequence, Tuple

from natserve import Server
from natserve._agent_config import agent_config
from natserve._protocol import Batch, Connection, Frame, ItemResult, Ready, Results
from natserve._worker import WorkerSpec, serve, spec_from_env


def worker_spec(server: Server, *, route: str, stage: int, worker_id: int) -> WorkerSpec:
    """The spec a worker process would get from an agent running ``server``'s config:
    the config entry the launcher writes, read back through the worker's own parser."""
    stages = server.routes[route]
    entry = agent_config(server.routes, [stages[stage]], ["python"])["stages"][0]
    return spec_from_env(
        {
            "NATSERVE_WORKER_SPEC": json.dumps(entry),
            "NATSERVE_WORKER_STAGES": str(len(stages)),
            "NATSERVE_WORKER_ID": str(worker_id),
        }
    )


class FakeAgent:
    """Plays the agent's side of one worker's socket; the worker runs in a thread.

    The class is handed over directly rather than resolved from the spec's
    ``module:qualname``, so tests may define workers inside their functions.
    """

    def __init__(
        self, server: Server, *, route: str = "/inference", stage: int = 0, worker_id: int = 1
    ) -> None:
        ours, theirs = socket.socketpair()
        ours.settimeout(10)
        self.conn = Connection(ours)
        self.exit_code: Optional[int] = None
        cls = server.routes[route][stage].worker
        spec = worker_spec(server, route=route, stage=stage, worker_id=worker_id)

        def run() -> None:
            self.exit_code = serve(theirs, cls, spec)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self._next_id = 1

    def read(self) -> Optional[Frame]:
        return self.conn.read_frame()

    def ready(self) -> Ready:
        frame = self.read()
        assert isinstance(frame, Ready), frame
        return frame

    def batch(
        self,
        items: Sequence[bytes],
        batch_id: Optional[int] = None,
        ids: Sequence[Tuple[str, str]] = (),
        edges: Sequence[int] = (),
    ) -> List[ItemResult]:
        """Runs one batch; ``ids`` (one (request id, trace id) per item) makes it kind 6,
        ``edges`` (one per item) kind 7."""
        if batch_id is None:
            batch_id, self._next_id = self._next_id, self._next_id + 1
        frame = Batch(id=batch_id, items=list(items), ids=list(ids), edges=list(edges))
        self.conn.write_frame(frame)
        frame = self.read()
        assert isinstance(frame, Results), frame
        assert frame.id == batch_id
        assert len(frame.items) == len(items)
        return frame.items

    def close(self) -> Optional[int]:
        self.conn.close()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.exit_code

    def join(self) -> Optional[int]:
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.exit_code
