"""The worker-process loop, driven over socketpair() by a fake agent."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List

import pytest

from fake_agent import FakeAgent
from natserve import Server, SSEWorker, Worker
from natserve._protocol import Batch, Cancel, Ready, Results, Status, Stream
from natserve.errors import (
    ClientError,
    DecodingError,
    EncodingError,
    ServerError,
    ValidationError,
)
from natserve.mixin import MsgpackMixin

Start = Callable[..., FakeAgent]


class Exp(Worker):
    def forward(self, req: Dict[str, Any]) -> Dict[str, float]:
        try:
            x = float(req["x"])
        except KeyError as err:
            raise ValidationError("cannot find key 'x'") from err
        except (TypeError, ValueError) as err:
            raise ValidationError("cannot convert 'x' value to float") from err
        return {"y": math.exp(x)}


class Raising(Worker):
    """Raises what the request names, to check each error's status and body."""

    def forward(self, req: Dict[str, Any]) -> Any:
        kind = req["raise"]
        if kind == "zero":
            return 1 / 0
        if kind == "key":
            return {}["missing"]
        errors = {
            "validation": ValidationError("bad x"),
            "decoding": DecodingError("bad bytes"),
            "client": ClientError("bad client"),
            "encoding": EncodingError("bad output"),
            "server": ServerError("model broke"),
            "long": ValidationError("x" * 5000),
            "empty": ValidationError(),
        }
        raise errors[kind]


def server_with(*workers: Any, **kwargs: Any) -> Server:
    server = Server()
    for worker in workers:
        server.append_worker(worker, **kwargs)
    return server


def body_json(result: Any) -> Any:
    assert result.status == Status.OK, result
    return json.loads(result.body)


def test_ready_then_results_in_order(start_worker: Start) -> None:
    agent = start_worker(server_with(Exp))
    assert agent.ready().pid == os.getpid()
    results = agent.batch([b'{"x": 2}', b'{"x": 0}', b'{"x": -1}'], batch_id=2**40)
    assert [body_json(r) for r in results] == [
        {"y": math.exp(2)},
        {"y": 1.0},
        {"y": math.exp(-1)},
    ]
    assert agent.close() == 0


def test_validation_errors_are_per_item(start_worker: Start) -> None:
    agent = start_worker(server_with(Exp))
    agent.ready()
    ok, missing, bad = agent.batch([b'{"x": 1}', b'{"y": 1}', b'{"x": "abc"}'])
    assert body_json(ok) == {"y": math.e}
    assert (missing.status, missing.body) == (
        Status.VALIDATION_ERROR,
        b"validation error: cannot find key 'x'",
    )
    assert (bad.status, bad.body) == (
        Status.VALIDATION_ERROR,
        b"validation error: cannot convert 'x' value to float",
    )


def test_undecodable_and_empty_bodies_are_decoding_errors(start_worker: Start) -> None:
    agent = start_worker(server_with(Exp))
    agent.ready()
    garbage, empty, binary = agent.batch([b"not json", b"", b"\xff\xfe"])
    for result in (garbage, empty, binary):
        assert result.status == Status.CLIENT_ERROR
        assert result.body.startswith(b"decoding error: ")
    assert empty.body == b"decoding error: empty request body, expected JSON"


@pytest.mark.parametrize(
    ("kind", "status", "body"),
    [
        ("validation", Status.VALIDATION_ERROR, "validation error: bad x"),
        ("decoding", Status.CLIENT_ERROR, "decoding error: bad bytes"),
        ("client", Status.CLIENT_ERROR, "client error: bad client"),
        ("encoding", Status.SERVER_ERROR, "encoding error: bad output"),
        ("server", Status.SERVER_ERROR, "server error: model broke"),
        ("zero", Status.SERVER_ERROR, "internal error: ZeroDivisionError: division by zero"),
        ("key", Status.SERVER_ERROR, "internal error: KeyError: 'missing'"),
        ("empty", Status.VALIDATION_ERROR, "validation error: invalid data"),
    ],
)
def test_each_error_maps_to_its_status_and_prefix(
    start_worker: Start, kind: str, status: Status, body: str
) -> None:
    agent = start_worker(server_with(Raising))
    agent.ready()
    (result,) = agent.batch([json.dumps({"raise": kind}).encode()])
    assert (result.status, result.body.decode()) == (status, body)


def test_internal_error_traceback_goes_to_the_log_not_the_client(
    start_worker: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="natserve")
    agent = start_worker(server_with(Raising))
    agent.ready()
    (result,) = agent.batch([b'{"raise": "zero"}'])
    assert b"Traceback" not in result.body and b"line" not in result.body
    logged = [r for r in caplog.records if r.exc_info and r.levelno == logging.ERROR]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert logged[0].exc_info[0] is ZeroDivisionError


def test_long_error_messages_are_truncated(start_worker: Start) -> None:
    agent = start_worker(server_with(Raising))
    agent.ready()
    (result,) = agent.batch([b'{"raise": "long"}'])
    assert result.body.startswith(b"validation error: xxx")
    assert result.body.endswith(b"...")
    assert len(result.body) < 250


class Doubler(Worker):
    """A batching worker that fails a whole batch when it holds a "bad" item."""

    calls: List[List[Any]] = []

    def forward(self, batch: List[Any]) -> List[Any]:
        Doubler.calls.append(list(batch))
        if "bad" in batch:
            raise ValueError("bad item in batch")
        if "invalid" in batch:
            raise ValidationError("invalid item in batch")
        return [v * 2 for v in batch]


@pytest.fixture
def doubler_calls() -> List[List[Any]]:
    Doubler.calls = []
    return Doubler.calls


def test_batch_splitting_isolates_the_bad_item(
    start_worker: Start, doubler_calls: List[List[Any]]
) -> None:
    agent = start_worker(server_with(Doubler, max_batch_size=8))
    agent.ready()
    items = [1, "bad", 3, 4, 5]
    results = agent.batch([json.dumps(v).encode() for v in items])
    assert [r.status for r in results] == [
        Status.OK,
        Status.SERVER_ERROR,
        Status.OK,
        Status.OK,
        Status.OK,
    ]
    assert [json.loads(r.body) for i, r in enumerate(results) if i != 1] == [2, 6, 8, 10]
    assert results[1].body == b"internal error: ValueError: bad item in batch"
    # the whole batch, then halves until the bad item runs alone
    assert doubler_calls[0] == items
    assert ["bad"] in doubler_calls
    assert [3, 4, 5] in doubler_calls  # the clean half ran once, as a batch


def test_batch_splitting_isolates_two_bad_items_of_different_kinds(
    start_worker: Start, doubler_calls: List[List[Any]]
) -> None:
    agent = start_worker(server_with(Doubler, max_batch_size=8))
    agent.ready()
    items = [1, 2, "invalid", 4, 5, 6, "bad", 8]
    results = agent.batch([json.dumps(v).encode() for v in items])
    statuses = [r.status for r in results]
    assert statuses[2] == Status.VALIDATION_ERROR
    assert results[2].body == b"validation error: invalid item in batch"
    assert statuses[6] == Status.SERVER_ERROR
    ok = [json.loads(r.body) for r in results if r.status == Status.OK]
    assert ok == [2, 4, 8, 10, 12, 16]


def test_an_undecodable_item_is_left_out_of_the_forward_batch(
    start_worker: Start, doubler_calls: List[List[Any]]
) -> None:
    agent = start_worker(server_with(Doubler, max_batch_size=8))
    agent.ready()
    results = agent.batch([b"1", b"{broken", b"3"])
    assert doubler_calls == [[1, 3]]
    assert [r.status for r in results] == [Status.OK, Status.CLIENT_ERROR, Status.OK]
    assert [results[0].body, results[2].body] == [b"2", b"6"]


class WrongLength(Worker):
    def forward(self, batch: List[Any]) -> Any:
        return batch[:-1] if len(batch) > 1 else {"not": "a list"}


def test_wrong_length_forward_fails_those_items_saying_so(start_worker: Start) -> None:
    agent = start_worker(server_with(WrongLength, max_batch_size=4))
    agent.ready()
    results = agent.batch([b"1", b"2", b"3"])
    for result in results:
        assert result.status == Status.SERVER_ERROR
        assert result.body.startswith(
            b"internal error: forward returned a list of 2 for a batch of 3"
        )
    (single,) = agent.batch([b"1"])
    assert single.status == Status.SERVER_ERROR
    assert b"forward returned a dict for a batch of 1" in single.body


def test_unbatched_stage_gets_one_item_per_forward_call(start_worker: Start) -> None:
    seen: List[Any] = []

    class One(Worker):
        def forward(self, data: Any) -> Any:
            seen.append(data)
            return data

    agent = start_worker(server_with(One))
    agent.ready()
    results = agent.batch([b"[1, 2]", b'{"a": 1}'])
    assert seen == [[1, 2], {"a": 1}]
    assert [r.body for r in results] == [b"[1, 2]", b'{"a": 1}']


def test_an_unexpected_frame_from_the_agent_ends_the_worker(start_worker: Start) -> None:
    agent = start_worker(server_with(Exp))
    agent.ready()
    agent.conn.write_frame(Ready(pid=1))
    assert agent.join() == 1


NESTING_BOMB = b"[" * 100_000 + b"]" * 100_000


def test_a_json_nesting_bomb_is_a_decoding_error_not_a_crash() -> None:
    with pytest.raises(DecodingError, match="nested too deeply") as info:
        Exp().deserialize(NESTING_BOMB)
    assert "JSON" in str(info.value)


def test_a_json_nesting_bomb_is_answered_400_beside_its_batch_mates(start_worker: Start) -> None:
    agent = start_worker(server_with(Exp))
    agent.ready()
    bomb, ok = agent.batch([NESTING_BOMB, b'{"x": 0}'])
    assert bomb.status == Status.CLIENT_ERROR
    assert bomb.body.startswith(b"decoding error: request body is nested too deeply")
    assert body_json(ok) == {"y": 1.0}


def test_moderately_nested_json_still_decodes() -> None:
    depth = 200
    assert Exp().deserialize(b"[" * depth + b"]" * depth) is not None


def test_a_msgpack_nesting_bomb_is_a_decoding_error_that_says_so() -> None:
    class Packed(MsgpackMixin, Worker):
        def forward(self, data: Any) -> Any:
            return data

    with pytest.raises(DecodingError, match="nested too deeply"):
        Packed().deserialize(b"\x91" * 100_000 + b"\xc0")


class Tokens(SSEWorker):
    """Streams ``<text>-<n>`` per item; raises after two events for a text of "bad"."""

    def forward(self, data: List[Any]) -> List[Any]:
        for n in range(3):
            for j, item in enumerate(data):
                if item == "bad" and n == 2:
                    raise RuntimeError("bad item")
                self.send_stream_event(f"{item}-{n}", index=j)
        return data


def stream_then_results(agent: FakeAgent, items: List[bytes], batch_id: int) -> Any:
    agent.conn.write_frame(Batch(id=batch_id, items=items))
    events: List[Stream] = []
    while True:
        frame = agent.read()
        if isinstance(frame, Results):
            return events, frame
        assert isinstance(frame, Stream), frame
        events.append(frame)


def test_stream_events_come_before_the_results_each_for_its_own_item(start_worker: Start) -> None:
    agent = start_worker(server_with(Tokens, max_batch_size=4))
    agent.ready()
    # The undecodable item is left out of forward's input: index 1 there is item 2 here.
    events, results = stream_then_results(agent, [b'"a"', b"{", b'"c"'], batch_id=9)
    assert {(e.id, e.index, e.body) for e in events} == {
        (9, i, f"{t}-{n}".encode()) for i, t in ((0, "a"), (2, "c")) for n in range(3)
    }
    assert [r.status for r in results.items] == [Status.OK, Status.CLIENT_ERROR, Status.OK]


def test_a_streamed_item_that_fails_is_answered_not_run_again(start_worker: Start) -> None:
    agent = start_worker(server_with(Tokens, max_batch_size=4))
    agent.ready()
    events, results = stream_then_results(agent, [b'"bad"', b'"ok"'], batch_id=1)
    # Both streamed two events before the failure: neither is run again, both fail.
    assert sorted(e.body for e in events) == sorted([b"bad-0", b"bad-1", b"ok-0", b"ok-1"])
    assert [r.status for r in results.items] == [Status.SERVER_ERROR, Status.SERVER_ERROR]


class Patient(SSEWorker):
    """Streams until its item is cancelled (at most 5 s), then answers how far it got."""

    def forward(self, data: Any) -> Any:
        started = time.monotonic()
        n = 0
        while not self.is_cancelled() and time.monotonic() - started < 5:
            self.send_stream_event(str(n))
            n += 1
            time.sleep(0.002)
        return {"cancelled": self.is_cancelled()}


def test_a_cancel_reaches_forward_while_it_runs(start_worker: Start) -> None:
    agent = start_worker(server_with(Patient))
    agent.ready()
    agent.conn.write_frame(Batch(id=3, items=[b"{}"]))
    first = agent.read()
    assert isinstance(first, Stream) and first.body == b"0"
    agent.conn.write_frame(Cancel(id=3, index=0))
    while True:
        frame = agent.read()
        if isinstance(frame, Results):
            break
    assert body_json(frame.items[0]) == {"cancelled": True}
    # A late cancel for a batch already answered changes nothing for the next one.
    agent.conn.write_frame(Cancel(id=3, index=0))
    agent.conn.write_frame(Batch(id=4, items=[b"{}"]))
    assert isinstance(agent.read(), Stream)
    agent.conn.write_frame(Cancel(id=4, index=0))


def test_a_bad_stream_index_is_the_item_s_error(start_worker: Start) -> None:
    class OutOfRange(SSEWorker):
        def forward(self, data: Any) -> Any:
            self.send_stream_event("x", index=1)
            return data

    agent = start_worker(server_with(OutOfRange))
    agent.ready()
    (result,) = agent.batch([b"{}"])
    assert result.status == Status.SERVER_ERROR
    assert b"index 1 is not an item of this forward call" in result.body
