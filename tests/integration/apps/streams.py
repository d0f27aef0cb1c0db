"""Streaming workers for tests/integration/test_streaming.py, on three routes:

- ``/chat``: a batched SSEWorker (batches of up to 4, gathered for 50 ms) that streams
  ``<text>-<n>`` for n in 0..count-1, raises after ``fail_after`` events when asked, or
  sleeps ``stall_s`` after its first event;
- ``/generate``: streams numbers every 10 ms until its client goes away, writing each
  one (and when it noticed the cancel) to the file the request names;
- ``/wait``: a plain worker that runs until its client goes away, then writes that down.
"""

import json
import time
from pathlib import Path
from typing import Any, List

from natserve import Server, SSEWorker, Worker


class Chat(SSEWorker):
    def forward(self, data: List[Any]) -> List[Any]:
        for n in range(max(item.get("count", 3) for item in data)):
            for j, item in enumerate(data):
                if n == item.get("fail_after"):
                    raise RuntimeError(f"boom after {n}")
                if n < item.get("count", 3):
                    self.send_stream_event(f"{item['text']}-{n}", index=j)
                if n == 0 and item.get("stall_s"):
                    time.sleep(item["stall_s"])
        return data


class Generate(SSEWorker):
    def forward(self, data: Any) -> Any:
        log = Path(data["log"])
        for n in range(2000):
            if self.is_cancelled():
                with log.open("a") as f:
                    f.write(json.dumps({"cancelled": n, "at": time.time()}) + "\n")
                return data
            self.send_stream_event(str(n))
            with log.open("a") as f:
                f.write(json.dumps({"event": n, "at": time.time()}) + "\n")
            time.sleep(0.01)
        return data


class Wait(Worker):
    def forward(self, data: Any) -> Any:
        log = Path(data["log"])
        started = time.monotonic()
        while time.monotonic() - started < 20:
            if self.is_cancelled():
                log.write_text(json.dumps({"cancelled_at": time.time()}))
                return data
            time.sleep(0.005)
        log.write_text(json.dumps({"finished": True}))
        return data


if __name__ == "__main__":
    server = Server()
    server.append_worker(Chat, max_batch_size=4, max_wait_time=50, route="/chat")
    server.append_worker(Generate, route="/generate")
    server.append_worker(Wait, route="/wait")
    server.run()
