"""One `Runtime` on two routes, placed differently: `Double` is the last stage of `/a`
(after `AddOne`) and the first of `/b` (before `Negate`). It answers with the size of the
batch it ran in, so a test can see batches that mix the two routes' requests."""

from __future__ import annotations

from typing import Any, Dict, List

from natserve import Runtime, Server, Worker


class AddOne(Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        return {"x": data["x"] + 1}


class Double(Worker):
    def forward(self, batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [{"x": item["x"] * 2, "batch": len(batch)} for item in batch]


class Negate(Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        return {"x": -data["x"], "batch": data["batch"]}


if __name__ == "__main__":
    double = Runtime(Double, max_batch_size=8, max_wait_time=2000)
    server = Server()
    server.register_runtime(
        {
            "/a": [Runtime(AddOne), double],
            "/b": [double, Runtime(Negate)],
        }
    )
    server.run()
