"""The examples behave as documented, through the real worker loop."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

from fake_agent import FakeAgent
from natserve import Server
from natserve._protocol import Status
from natserve.errors import ValidationError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

Start = Callable[..., FakeAgent]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: run() is not called
    return module


def test_exp_forward() -> None:
    exp = load("exp")
    worker = exp.CalculateExp()
    assert worker.forward({"x": 2}) == {"y": math.exp(2)}
    assert worker.forward({"x": "1.5"}) == {"y": math.exp(1.5)}
    with pytest.raises(ValidationError, match="cannot find key 'x'"):
        worker.forward({"z": 1})
    for bad in ("abc", None, [1]):
        with pytest.raises(ValidationError, match="cannot convert 'x' value to float"):
            worker.forward({"x": bad})


def test_exp_through_the_worker_loop(start_worker: Start) -> None:
    exp = load("exp")
    server = Server()
    server.append_worker(exp.CalculateExp, num=2)
    agent = start_worker(server, worker_id=2)
    agent.ready()
    ok, missing, empty = agent.batch([b'{"x": 2}', b"{}", b""])
    assert (ok.status, json.loads(ok.body)) == (Status.OK, {"y": 7.38905609893065})
    assert missing.body == b"validation error: cannot find key 'x'"
    assert empty.status == Status.CLIENT_ERROR


def test_pipeline_answers_each_request_with_its_own_result(start_worker: Start) -> None:
    pipeline = load("pipeline")
    server = Server()
    server.append_worker(pipeline.Preprocess, num=2)
    server.append_worker(pipeline.Inference, max_batch_size=8, max_wait_time=10)
    pre = start_worker(server, stage=0)
    inf = start_worker(server, stage=1)
    pre.ready()
    inf.ready()
    inputs = [3, -1.5, 0, 100]
    handed_on = [r.body for r in pre.batch([json.dumps({"x": x}).encode() for x in inputs])]
    results = inf.batch(handed_on)
    assert [json.loads(r.body) for r in results] == [
        {"x": float(x), "y": 2.0 * x, "batch": 4} for x in inputs
    ]
    (bad,) = pre.batch([b'{"x": "nope"}'])
    assert bad.body == b"validation error: cannot convert 'x' value to float"
