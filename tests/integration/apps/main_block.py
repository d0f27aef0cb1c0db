"""An app whose main block does what only the launcher may do, as Mosec's
python_side_metrics example does: it binds a port of its own (a side metrics server)
and records that it ran. Worker processes must not run it again (they would fail to
bind, and record themselves); its worker answers with what its process saw.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Dict, List

from natserve import Server, Worker


class Report(Worker):
    def forward(self, batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        seen = {
            "pid": os.getpid(),
            "module": __name__,
            "argv": sys.argv[1:],
            "stage": self.stage,
            "worker_id": self.worker_id,
            "batch": self.max_batch_size,
        }
        return [seen for _ in batch]


if __name__ == "__main__":
    side = socket.socket()
    side.bind(("127.0.0.1", int(os.environ["SIDE_PORT"])))
    side.listen()
    with open(os.environ["MAIN_BLOCK_LOG"], "a") as f:
        f.write(f"{os.getpid()}\n")
    server = Server()
    server.append_worker(Report, num=2, max_batch_size=4, max_wait_time=1)
    server.run()
