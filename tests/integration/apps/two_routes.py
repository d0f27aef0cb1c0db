"""Two routes in one program: `/v1/upper` (one stage) and `/v1/count` (two stages)."""

from __future__ import annotations

from typing import Any, Dict, List

from natserve import Server, Worker


class Upper(Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        return {"text": str(data["text"]).upper()}


class Split(Worker):
    def forward(self, data: Dict[str, Any]) -> List[str]:
        return str(data["text"]).split()


class Count(Worker):
    def forward(self, words: List[List[str]]) -> List[Dict[str, int]]:
        return [{"words": len(w)} for w in words]


if __name__ == "__main__":
    server = Server()
    server.append_worker(Upper, route="/v1/upper")
    server.append_worker(Split, route="/v1/count")
    server.append_worker(Count, route="/v1/count", max_batch_size=4, max_wait_time=5)
    server.run()
