"""`Runtime`: Mosec's bundle of one worker class and its stage arguments.

``Server.register_runtime({"/a": [pre, model], "/b": [model]})`` puts runtimes on routes;
``append_worker`` builds one per call. In Mosec a runtime named on several routes is one
stage with one queue and one set of processes that all those routes share. natserve's
wire has no shared stages yet, so each route gets its own stage of that runtime: its own
queue and its own ``num`` worker processes per agent.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Type

from ._stage import check_env, check_int, check_start_method, check_timeout, check_worker
from ._worker_base import Worker

_ids = itertools.count(1)


class Runtime:
    """One worker class with its stage arguments, as Mosec's ``mosec.Runtime``.

    Args:
        worker: a `Worker` subclass (the class, not an instance).
        num: worker processes for this stage on each agent that hosts it, >= 1.
        max_batch_size: largest batch `forward` gets, >= 1; above 1 it gets lists.
        max_wait_time: ms to wait for a batch to fill after its first item, >= 0.
        timeout: seconds (int or float, >= 0) a batch may run in ``forward`` before the
            worker process is replaced and the batch's items answered 504; 0 leaves only
            the request's own deadline (``--timeout``).
        start_method: "spawn" or "fork", accepted for Mosec compatibility; worker
            processes are always fresh interpreters started by the agent.
        env: None, or one dict of extra environment variables per worker process.
    """

    def __init__(
        self,
        worker: Type[Worker],
        *,
        num: int = 1,
        max_batch_size: int = 1,
        max_wait_time: int = 0,
        timeout: float = 0.0,
        start_method: str = "spawn",
        env: Optional[List[Dict[str, str]]] = None,
    ) -> None:
        self._setup(
            "Runtime",
            worker,
            num=num,
            max_batch_size=max_batch_size,
            max_wait_time=max_wait_time,
            timeout=timeout,
            start_method=start_method,
            env=env,
        )

    @classmethod
    def _checked(cls, where: str, worker: Type[Worker], **kwargs: Any) -> Runtime:
        """A runtime whose argument errors name ``where`` (``append_worker``) as the call."""
        runtime = cls.__new__(cls)
        runtime._setup(where, worker, **kwargs)
        return runtime

    def _setup(
        self,
        where: str,
        worker: Type[Worker],
        *,
        num: int,
        max_batch_size: int,
        max_wait_time: int,
        timeout: float,
        start_method: str,
        env: Optional[List[Dict[str, str]]],
    ) -> None:
        self.worker = check_worker(worker, where=where)
        self.num = check_int("num", num, 1, ">= 1", where=where)
        self.max_batch_size = check_int("max_batch_size", max_batch_size, 1, ">= 1", where=where)
        self.max_wait_time = check_int(
            "max_wait_time", max_wait_time, 0, ">= 0 (milliseconds)", where=where
        )
        self.timeout = check_timeout(timeout, where=where)
        self.start_method = check_start_method(start_method, where=where)
        self.env = check_env(env, num, where=where)
        # Mosec's naming, so logs of a class used twice tell the runtimes apart.
        self.name = f"{self.worker.__name__}_{next(_ids)}"

    def __repr__(self) -> str:
        return (
            f"Runtime({self.worker.__name__}, num={self.num}, "
            f"max_batch_size={self.max_batch_size}, max_wait_time={self.max_wait_time}, "
            f"timeout={self.timeout})"
        )
