"""Log lines of a worker process: the JSON format, and the ids of the request that runs
(from the agent's kind 6 BATCH frame) on every record and in ``self.request_ids``."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Dict, Iterator, List

import pytest

from fake_agent import FakeAgent
from natserve import Server, Worker, get_logger
from natserve._logging import JsonFormatter, configure
from natserve._protocol import Status

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class Echo(Worker):
    """Answers each item with the ids it ran under, and logs them."""

    def forward(self, data: List[Any]) -> List[Dict[str, Any]]:
        get_logger().info("forward of %d", len(data))
        return [{"request_ids": self.request_ids, "trace_ids": self.trace_ids} for _ in data]


class Single(Worker):
    def forward(self, data: Any) -> Any:
        if data == "boom":
            raise RuntimeError("boom")
        return {"request_ids": self.request_ids, "trace_ids": self.trace_ids}


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """natserve's logger writing JSON to the captured stderr, put back to text afterwards."""
    configure("info", log_format="json")
    yield capsys
    configure("info")


def json_lines(text: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_json_line_has_the_rust_binaries_fields() -> None:
    record = logging.LogRecord("natserve.worker", logging.ERROR, __file__, 1, "x=%d", (3,), None)
    try:
        raise ValueError("bad")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter("[/a:0 #1]").format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["level"] == "ERROR"
    assert parsed["target"] == "natserve.worker"
    assert parsed["message"] == "x=3"
    assert parsed["worker"] == "[/a:0 #1]"
    assert parsed["timestamp"].endswith("Z")
    assert "ValueError: bad" in parsed["exception"]
    assert "request_id" not in parsed and "trace_id" not in parsed


def test_a_batch_s_ids_reach_forward_and_its_log_lines(
    start_worker: Any, stderr: pytest.CaptureFixture[str]
) -> None:
    server = Server()
    server.append_worker(Echo, max_batch_size=4, max_wait_time=1)
    agent: FakeAgent = start_worker(server)
    agent.ready()
    results = agent.batch([b"1", b"2"], ids=[("r-1", TRACE), ("r-2", "")])
    assert [r.status for r in results] == [Status.OK, Status.OK]
    for result in results:
        assert json.loads(result.body) == {"request_ids": ["r-1", "r-2"], "trace_ids": [TRACE, ""]}
    (line,) = [x for x in json_lines(stderr.readouterr().err) if x["message"] == "forward of 2"]
    assert line["request_id"] == "r-1,r-2"
    assert line["trace_id"] == TRACE


def test_each_item_runs_under_its_own_ids_and_its_failure_is_logged_with_them(
    start_worker: Any, stderr: pytest.CaptureFixture[str]
) -> None:
    server = Server()
    server.append_worker(Single)
    agent: FakeAgent = start_worker(server)
    agent.ready()
    results = agent.batch([b'"a"', b'"boom"'], ids=[("r-1", TRACE), ("r-2", "")])
    assert json.loads(results[0].body) == {"request_ids": ["r-1"], "trace_ids": [TRACE]}
    assert results[1].status == Status.SERVER_ERROR
    (failed,) = [x for x in json_lines(stderr.readouterr().err) if x["level"] == "ERROR"]
    assert failed["request_id"] == "r-2"
    assert "trace_id" not in failed
    assert "RuntimeError: boom" in failed["exception"]


def test_a_batch_without_ids_and_warm_up_see_none(start_worker: Any) -> None:
    server = Server()
    server.append_worker(Single)
    agent: FakeAgent = start_worker(server)
    agent.ready()
    (result,) = agent.batch([b'"a"'])
    assert json.loads(result.body) == {"request_ids": [], "trace_ids": []}
    assert Single().request_ids == [] and Single().trace_ids == []


def test_a_text_line_ends_with_the_ids_of_the_request_that_runs(
    start_worker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("info")
    server = Server()
    server.append_worker(Echo, max_batch_size=4, max_wait_time=1)
    agent: FakeAgent = start_worker(server)
    agent.ready()
    agent.batch([b"1"], ids=[("r-1", TRACE)])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "forward of 1" in x]
    assert line.endswith(f"natserve: forward of 1 request_id=r-1 trace_id={TRACE}")
