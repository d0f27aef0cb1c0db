"""Server.append_worker: pipelines in order, and argument errors that say what is right."""

from __future__ import annotations

import re
from typing import Any

import pytest

from natserve import Server, Worker


class Echo(Worker):
    def forward(self, data: Any) -> Any:
        return data


class Other(Worker):
    def forward(self, data: Any) -> Any:
        return data


def test_repeated_calls_build_a_pipeline_per_route() -> None:
    server = Server()
    server.append_worker(Echo, num=2)
    server.append_worker(Other, max_batch_size=8, max_wait_time=10, timeout=0.5)
    server.append_worker(Other, route="/v1/other", env=[{"A": "1"}])
    routes = server.routes
    assert list(routes) == ["/inference", "/v1/other"]
    first, second = routes["/inference"]
    assert (first.index, first.name, first.num, first.max_batch_size) == (0, "Echo", 2, 1)
    assert (second.index, second.name, second.max_batch_size) == (1, "Other", 8)
    assert (second.max_wait_time, second.timeout, second.mime) == (10, 0.5, "application/json")
    assert second.timeout_ms == 500  # seconds, as in Mosec, become the agent's ms
    (only,) = routes["/v1/other"]
    assert (only.index, only.env) == (0, [{"A": "1"}])


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"num": 0}, ValueError, ["num", "0", ">= 1"]),
        ({"num": "2"}, TypeError, ["num", "'2'", "int"]),
        ({"num": True}, TypeError, ["num", "True"]),
        ({"max_batch_size": 0}, ValueError, ["max_batch_size", "0", ">= 1"]),
        ({"max_wait_time": -1}, ValueError, ["max_wait_time", "-1", ">= 0", "milliseconds"]),
        ({"max_wait_time": 1.5}, TypeError, ["max_wait_time", "1.5"]),
        ({"timeout": -5}, ValueError, ["timeout", "-5", ">= 0", "seconds"]),
        ({"timeout": "1"}, TypeError, ["timeout", "'1'", "seconds"]),
        ({"timeout": float("nan")}, ValueError, ["timeout", "nan", "seconds"]),
        ({"route": []}, TypeError, ["route", "[]", "non-empty list"]),
        ({"route": ["/a", "/a"]}, ValueError, ["route", "'/a' twice"]),
        ({"start_method": "forkserver"}, ValueError, ["start_method", "'forkserver'", "'spawn'"]),
        ({"env": {"A": "1"}}, TypeError, ["env", "list of exactly num=1 dicts"]),
        ({"num": 2, "env": [{"A": "1"}]}, ValueError, ["env", "num=2", "a list of 1"]),
        ({"env": [{"A": 1}]}, TypeError, ["env[0]", "str to str", "{'A': 1}"]),
        ({"route": "inference"}, ValueError, ["route", "'inference'", "/inference"]),
        ({"route": "/a//b"}, ValueError, ["route", "'/a//b'"]),
        ({"route": "/a b"}, ValueError, ["route", "'/a b'"]),
        ({"route": "/a/"}, ValueError, ["route", "'/a/'"]),
        ({"route": "/a.b"}, ValueError, ["route", "'/a.b'"]),
    ],
)
def test_bad_arguments_name_the_argument_value_and_fix(
    kwargs: Any, error: type, words: Any
) -> None:
    server = Server()
    with pytest.raises(error) as info:
        server.append_worker(Echo, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert server.routes == {}  # nothing half-added


def test_route_slug_collisions_are_refused() -> None:
    server = Server()
    server.append_worker(Echo, route="/a/b")
    with pytest.raises(ValueError, match=re.escape("route '/a_b' and route '/a/b'")):
        server.append_worker(Echo, route="/a_b")
    server.append_worker(Echo, route="/a/b")  # the same route is a pipeline, not a collision
    assert len(server.routes["/a/b"]) == 2


@pytest.mark.parametrize("worker", [object, Echo(), "Echo", None])
def test_worker_must_be_a_worker_subclass(worker: Any) -> None:
    with pytest.raises(TypeError, match=r"worker must be a subclass of natserve\.Worker"):
        Server().append_worker(worker)


def test_worker_without_forward_is_refused_up_front() -> None:
    class NoForward(Worker):
        pass

    with pytest.raises(TypeError, match="NoForward must implement forward"):
        Server().append_worker(NoForward)


def test_run_without_workers_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"append_worker"):
        Server().run()


@pytest.mark.parametrize(
    ("route", "what"), [("/metrics", "Prometheus metrics"), ("/", "readiness check")]
)
def test_routes_the_ingress_answers_itself_are_refused(route: str, what: str) -> None:
    server = Server()
    with pytest.raises(ValueError) as info:
        server.append_worker(Echo, route=route)
    message = str(info.value)
    for word in ("route", repr(route), what, "choose another path"):
        assert word in message, (word, message)
    assert server.routes == {}


@pytest.mark.parametrize("route", ["/results", "/results/x"])
def test_routes_under_results_are_refused(route: str) -> None:
    class W(Worker):
        def forward(self, data: object) -> object:
            return data

    with pytest.raises(ValueError, match="asynchronous jobs"):
        Server().append_worker(W, route=route)


@pytest.mark.parametrize("route", ["/openapi", "/openapi/metadata.json", "/openapi/swagger"])
def test_routes_under_openapi_are_refused(route: str) -> None:
    class W(Worker):
        def forward(self, data: object) -> object:
            return data

    with pytest.raises(ValueError, match="OpenAPI document"):
        Server().append_worker(W, route=route)
