"""A worker whose behaviour each request picks, for status and fault tests.

{"action": "echo"}                 -> 200, with the agent and worker that ran it
{"action": "raise"}                -> the worker raises RuntimeError (500)
{"action": "crash"}                -> the worker process dies mid-batch (500, restarted)
{"action": "sleep", "seconds": s}  -> sleeps, then echoes

With BEHAVE_STAGES=2 a stage that passes each request on runs first: a pipeline.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict

from natserve import Server, Worker


class Behave(Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        action = data.get("action", "echo")
        log = os.environ.get("BEHAVE_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{data.get('tag', '-')}\n")
        if action == "raise":
            raise RuntimeError("boom")
        if action == "crash":
            os._exit(3)
        if action == "sleep":
            time.sleep(float(data["seconds"]))
        return {
            "echo": data,
            "agent": os.path.dirname(os.environ.get("NATSERVE_SOCKET", "")),
            "pid": os.getpid(),
            "worker_id": self.worker_id,
        }


class Pass(Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        return data


if __name__ == "__main__":
    server = Server()
    if os.environ.get("BEHAVE_STAGES") == "2":
        server.append_worker(Pass, num=int(os.environ.get("BEHAVE_WORKERS", "1")))
    server.append_worker(
        Behave,
        num=int(os.environ.get("BEHAVE_WORKERS", "1")),
        timeout=int(os.environ.get("BEHAVE_TIMEOUT_MS", "0")) / 1000,
    )
    server.run()
