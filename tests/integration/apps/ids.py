"""A two-stage app whose workers log, through natserve's logger, the ids their request
came with (``self.request_ids``, ``self.trace_ids``), and answer with them."""

from __future__ import annotations

from typing import Any, Dict

from natserve import Server, Worker, get_logger

logger = get_logger()


class First(Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        logger.info("first stage sees %s %s", self.request_ids, self.trace_ids)
        return data


class Second(Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        logger.info("second stage sees %s %s", self.request_ids, self.trace_ids)
        return {"request_ids": self.request_ids, "trace_ids": self.trace_ids}


if __name__ == "__main__":
    server = Server()
    server.append_worker(First)
    server.append_worker(Second)
    server.run()
