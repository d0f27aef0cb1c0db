"""The worker-process loop across stages: JSON at the edges, msgpack (or an opt-in mixin)
between stages, warm-up before READY and the worker's identity (the entry point of a
worker process is in test_worker_process.py)."""

from __future__ import annotations

import json
import math
import pickle
from datetime import date
from typing import Any, Callable, Dict, List

import msgpack

from fake_agent import FakeAgent
from natserve import Runtime, Server, Worker
from natserve._protocol import EDGE_FIRST, EDGE_LAST, Status
from natserve.mixin import MsgpackMixin, PickleMixin

Start = Callable[..., FakeAgent]


def server_with(*workers: Any, **kwargs: Any) -> Server:
    server = Server()
    for worker in workers:
        server.append_worker(worker, **kwargs)
    return server


class Exp(Worker):
    def forward(self, req: Dict[str, Any]) -> Dict[str, float]:
        return {"y": math.exp(req["x"])}


class First(Worker):
    def forward(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return {"v": req["x"] + 1, "raw": b"\x00\x01"}


class Middle(Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        assert data["raw"] == b"\x00\x01"  # bytes survive msgpack between stages
        return {"v": data["v"] * 10}


class Last(Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        return {"result": data["v"]}


def test_pipeline_stages_use_json_at_the_edges_and_msgpack_between(start_worker: Start) -> None:
    server = server_with(First, Middle, Last)
    first = start_worker(server, stage=0)
    middle = start_worker(server, stage=1)
    last = start_worker(server, stage=2)
    for agent in (first, middle, last):
        agent.ready()
    (r0,) = first.batch([b'{"x": 1}'])
    assert r0.status == Status.OK
    assert msgpack.unpackb(r0.body) == {"v": 2, "raw": b"\x00\x01"}
    (r1,) = middle.batch([r0.body])
    assert r1.status == Status.OK and msgpack.unpackb(r1.body) == {"v": 20}
    (r2,) = last.batch([r1.body])
    assert r2.status == Status.OK and json.loads(r2.body) == {"result": 20}
    # a later stage does not treat its input as JSON
    (bad,) = last.batch([b'{"v": 1}'])
    assert bad.status == Status.SERVER_ERROR
    assert bad.body.startswith(b"server error: cannot decode the previous stage's output")


class Double(Worker):
    def forward(self, data: Dict[str, Any]) -> Dict[str, Any]:
        return {"v": data["v"] * 2}


def test_a_shared_stage_decodes_and_encodes_each_item_as_its_route_places_it(
    start_worker: Start,
) -> None:
    # Double is stage 1 of /a (after First) and stage 0 of /b, the last of neither.
    server = Server()
    double = Runtime(Double)
    server.register_runtime({"/a": [Runtime(First), double, Runtime(Last)], "/b": [double]})
    agent = start_worker(server, route="/a", stage=1)
    assert agent.ready().reads_edges
    from_first = msgpack.packb({"v": 3, "raw": b""})
    results = agent.batch(
        [from_first, b'{"v": 5}'],
        ids=[("r-a", ""), ("r-b", "")],
        edges=[0, EDGE_FIRST | EDGE_LAST],
    )
    assert [r.status for r in results] == [Status.OK, Status.OK]
    assert msgpack.unpackb(results[0].body) == {"v": 6}  # on to Last, as msgpack
    assert json.loads(results[1].body) == {"v": 10}  # /b's answer, as JSON
    # Without edges every item stands where the worker's own stage (/a, 1) does.
    (alone,) = agent.batch([from_first])
    assert msgpack.unpackb(alone.body) == {"v": 6}


class SetMaker(Worker):
    def forward(self, req: Any) -> Any:
        return {1, 2, 3}


def test_msgpack_ipc_refuses_what_it_cannot_encode(start_worker: Start) -> None:
    server = server_with(SetMaker, Last)
    agent = start_worker(server, stage=0)
    agent.ready()
    (result,) = agent.batch([b"{}"])
    assert result.status == Status.SERVER_ERROR
    assert result.body.startswith(b"encoding error: cannot serialize the result for the next stage")


def test_unserializable_last_stage_output_is_an_encoding_error(start_worker: Start) -> None:
    agent = start_worker(server_with(SetMaker))
    agent.ready()
    (result,) = agent.batch([b"{}"])
    assert result.status == Status.SERVER_ERROR
    assert result.body.startswith(b"encoding error: cannot serialize the result as JSON")


def test_warm_up_runs_the_example_before_ready(start_worker: Start) -> None:
    seen: List[Any] = []

    class Warm(Worker):
        example = {"x": 1}

        def forward(self, data: Any) -> Any:
            seen.append(data)
            return data

    agent = start_worker(server_with(Warm))
    agent.ready()
    assert seen == [{"x": 1}]  # READY arrived and no batch was sent yet


def test_warm_up_passes_each_multi_example_to_forward_as_given(start_worker: Start) -> None:
    """Mosec's call shape: a batching stage's example is already the batch; it is never
    wrapped in copies, and multi_examples win over example."""
    seen: List[Any] = []

    class Warm(Worker):
        example = "not used: multi_examples win"
        multi_examples = [[0, 1e-5], [2e-4]]

        def forward(self, batch: List[Any]) -> List[Any]:
            seen.append(batch)
            return batch

    agent = start_worker(server_with(Warm, max_batch_size=32))
    agent.ready()
    assert seen == [[0, 1e-5], [2e-4]]


def test_failed_warm_up_is_logged_and_the_worker_serves_anyway(
    start_worker: Start, caplog: Any
) -> None:
    class Broken(Worker):
        example = {"y": 1}

        def forward(self, data: Any) -> Any:
            return data["x"]

    agent = start_worker(server_with(Broken))
    agent.ready()  # as in Mosec: a bad example does not keep the worker from serving
    (result,) = agent.batch([b'{"x": 3}'])
    assert result.status == Status.OK and json.loads(result.body) == 3
    assert "warm-up 1 of 1 failed; serving anyway" in caplog.text


def test_failed_strict_warm_up_exits_without_ready(start_worker: Start) -> None:
    class Broken(Worker):
        example = {"y": 1}
        strict_warmup = True

        def forward(self, data: Any) -> Any:
            return data["x"]

    agent = start_worker(server_with(Broken))
    assert agent.read() is None  # the worker closed its socket instead of READY
    assert agent.join() == 1


def test_worker_id_and_stage_are_set_when_init_runs(start_worker: Start) -> None:
    seen: List[Any] = []

    class Pre(Worker):
        def forward(self, data: Any) -> Any:
            return data

    class Identity(Worker):
        def __init__(self) -> None:
            seen.append((self.worker_id, self.stage, self.max_batch_size))
            super().__init__()
            seen.append((self.worker_id, self.stage, self.max_batch_size))

        def forward(self, batch: List[Any]) -> List[Any]:
            return [[self.worker_id, self.stage] for _ in batch]

    server = Server()
    server.append_worker(Pre)
    server.append_worker(Identity, num=3, max_batch_size=2)
    agent = start_worker(server, stage=1, worker_id=3)
    agent.ready()
    assert seen == [(3, 1, 2), (3, 1, 2)]
    (result,) = agent.batch([msgpack.packb(0)])
    assert json.loads(result.body) == [3, 1]


class DateMaker(PickleMixin, Worker):
    def forward(self, req: Dict[str, Any]) -> Any:
        return {"day": date(2024, 1, req["d"])}


class DateReader(PickleMixin, Worker):
    def forward(self, data: Dict[str, Any]) -> Any:
        return data["day"].isoformat()


def test_pickle_mixin_carries_any_object_between_stages(start_worker: Start) -> None:
    server = server_with(DateMaker, DateReader)
    first = start_worker(server, stage=0)
    last = start_worker(server, stage=1)
    first.ready()
    last.ready()
    (r0,) = first.batch([b'{"d": 5}'])
    assert r0.status == Status.OK
    assert pickle.loads(r0.body) == {"day": date(2024, 1, 5)}
    (r1,) = last.batch([r0.body])
    assert (r1.status, r1.body) == (Status.OK, b'"2024-01-05"')


class MsgpackEcho(MsgpackMixin, Worker):
    def forward(self, data: Any) -> Any:
        return {"got": data}


def test_msgpack_mixin_at_the_edges(start_worker: Start) -> None:
    server = server_with(MsgpackEcho)
    assert server.routes["/inference"][0].mime == "application/msgpack"
    agent = start_worker(server)
    agent.ready()
    ok, garbage, empty = agent.batch([msgpack.packb([1, b"\x00"]), b"\xc1", b""])
    assert ok.status == Status.OK
    assert msgpack.unpackb(ok.body) == {"got": [1, b"\x00"]}
    assert garbage.status == Status.CLIENT_ERROR
    assert garbage.body.startswith(b"decoding error: request body is not valid msgpack")
    assert empty.body == b"decoding error: empty request body, expected msgpack"
