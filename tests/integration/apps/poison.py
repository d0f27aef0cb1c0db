"""A batched worker that dies (SIGKILL on itself) when its batch holds an item marked
{"poison": true}; every other item is echoed with the worker's pid. With POISON_LOG set,
each batch's tags are appended there as one line before it runs."""

from __future__ import annotations

import os
import signal
from typing import Any, Dict, List

from natserve import Server, Worker


class Poison(Worker):
    def forward(self, batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        log = os.environ.get("POISON_LOG")
        if log:
            with open(log, "a") as f:
                f.write(" ".join(str(item.get("tag", "-")) for item in batch) + "\n")
        if any(item.get("poison") for item in batch):
            os.kill(os.getpid(), signal.SIGKILL)
        return [{"tag": item.get("tag"), "pid": os.getpid()} for item in batch]


if __name__ == "__main__":
    server = Server()
    server.append_worker(Poison, num=1, max_batch_size=8, max_wait_time=300)
    server.run()
