"""Mosec 0.9's user API, importable from natserve with Mosec's meaning: names, Runtime and
shared routes, SSEWorker, plasma refused, errors, utils, mixins and flags."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Dict, List

import msgpack
import numpy as np
import pytest
from msgspec import Struct

import natserve
from fake_agent import FakeAgent
from natserve import Runtime, Server, SSEWorker, Worker, errors
from natserve._protocol import Status
from natserve._settings import check_script_flags, mosec_flag_notices, parse_settings
from natserve.mixin import (
    MsgpackMixin,
    NumBinIPCMixin,
    PlasmaShmIPCMixin,
    RedisShmIPCMixin,
    TypedMsgPackMixin,
)
from natserve.utils import ParseTarget

# The public names of mosec/__init__.py, mosec/errors.py and mosec/mixin/__init__.py (0.9.8).
MOSEC_TOP = [
    "ClientError", "DecodingError", "EncodingError", "Runtime", "SSEWorker", "Server",
    "ServerError", "ValidationError", "Worker", "get_logger",
]  # fmt: skip
MOSEC_ERRORS = [
    "MosecError", "ClientError", "ServerError", "EncodingError", "DecodingError",
    "ValidationError", "MosecTimeoutError",
]  # fmt: skip
MOSEC_MIXINS = [
    "MsgpackMixin", "NumBinIPCMixin", "PlasmaShmIPCMixin", "RedisShmIPCMixin",
    "TypedMsgPackMixin",
]  # fmt: skip


def test_every_public_mosec_name_is_importable() -> None:
    for name in MOSEC_TOP:
        assert name in natserve.__all__ and hasattr(natserve, name), name
    for name in MOSEC_ERRORS:
        assert hasattr(errors, name), name
    for name in MOSEC_MIXINS:
        assert hasattr(natserve.mixin, name), name
    assert set(MOSEC_MIXINS) <= set(natserve.mixin.__all__)
    assert {"register_runtime", "register_daemon", "append_worker", "run"} <= set(dir(Server))


def test_error_hierarchy_matches_mosec() -> None:
    assert issubclass(errors.DecodingError, errors.ClientError)
    assert issubclass(errors.EncodingError, errors.ServerError)
    for name in ("ClientError", "ServerError", "ValidationError"):
        assert issubclass(getattr(errors, name), errors.MosecError)
    # BaseException in Mosec, so `except Exception` does not catch it.
    assert not issubclass(errors.MosecTimeoutError, Exception)
    assert issubclass(errors.MosecTimeoutError, BaseException)


class Pre(Worker):
    def forward(self, data: Any) -> Any:
        return data


class Model(Worker):
    def forward(self, data: Any) -> Any:
        return data


def test_register_runtime_builds_one_stage_per_route_for_a_shared_runtime() -> None:
    pre = Runtime(Pre)
    model = Runtime(Model, max_batch_size=16, timeout=1.5, env=[{"A": "1"}])
    server = Server()
    server.register_runtime({"/v1/inference": [pre, model], "/inference": [model]})
    routes = server.routes
    assert [s.name for s in routes["/v1/inference"]] == ["Pre", "Model"]
    (only,) = routes["/inference"]
    assert (only.index, only.max_batch_size, only.timeout_ms, only.env) == (
        0, 16, 1500, [{"A": "1"}],
    )  # fmt: skip


def test_register_runtime_only_on_an_empty_server_and_checks_everything_first() -> None:
    server = Server()
    with pytest.raises(TypeError, match=r"routes\['/b'\]\[0\] must be a natserve.Runtime"):
        server.register_runtime({"/a": [Runtime(Pre)], "/b": [Pre]})  # type: ignore[list-item]
    assert server.routes == {}  # nothing half-added
    with pytest.raises(ValueError, match=r"routes\['/a'\] is empty"):
        server.register_runtime({"/a": []})
    server.append_worker(Pre)
    with pytest.raises(RuntimeError, match="register_runtime on an empty Server"):
        server.register_runtime({"/b": [Runtime(Model)]})


def test_runtime_arguments_are_checked_naming_runtime() -> None:
    with pytest.raises(ValueError, match=r"Runtime: num must be an int >= 1, got 0"):
        Runtime(Pre, num=0)
    with pytest.raises(TypeError, match=r"Runtime: timeout must be a number of seconds"):
        Runtime(Pre, timeout="1")  # type: ignore[arg-type]


def test_append_worker_with_a_route_list_adds_the_stage_to_each() -> None:
    server = Server()
    server.append_worker(Pre, route="/a")
    server.append_worker(Model, route=["/a", "/b"], timeout=2)
    assert [s.name for s in server.routes["/a"]] == ["Pre", "Model"]
    assert [(s.name, s.index, s.timeout_ms) for s in server.routes["/b"]] == [("Model", 0, 2000)]


def test_timeout_is_seconds_as_a_float() -> None:
    server = Server()
    server.append_worker(Pre, timeout=0.5)
    server.append_worker(Model, timeout=0.0001)  # never rounds down to 0, which means off
    first, second = server.routes["/inference"]
    assert (first.timeout_ms, second.timeout_ms) == (500, 1)


class Streamer(SSEWorker):
    def forward(self, data: Any) -> Any:
        self.send_stream_event("x", index=0)
        return data


def test_sse_worker_is_served_last_and_streams_only_inside_a_request() -> None:
    server = Server()
    server.append_worker(Pre)
    server.append_worker(Streamer)
    assert [s.streams for s in server.routes["/inference"]] == [False, True]
    assert server.routes["/inference"][1].mime == "text/event-stream"
    with pytest.raises(ValueError, match="Streamer is an SSEWorker, so it must be the last stage"):
        server.append_worker(Pre)
    Runtime(Streamer)  # accepted
    worker = Streamer.__new__(Streamer)
    worker.send_stream_event("warm-up events go nowhere", index=1)
    assert worker.is_cancelled() is False
    with pytest.raises(TypeError, match="text must be a str"):
        worker.send_stream_event(b"bytes")  # type: ignore[arg-type]


class Plasma(PlasmaShmIPCMixin, Worker):
    def forward(self, data: Any) -> Any:
        return data


def test_plasma_can_be_defined_but_not_used() -> None:
    with pytest.raises(NotImplementedError, match="not supported: plasma was removed from pyarrow"):
        Server().append_worker(Plasma)
    with pytest.raises(NotImplementedError, match="not supported: plasma was removed from pyarrow"):
        Plasma.set_plasma_path("/tmp/plasma")


def test_register_daemon_checks_its_arguments() -> None:
    server = Server()
    with pytest.raises(TypeError, match=r"register_daemon: proc must be a subprocess\.Popen"):
        server.register_daemon("cache", 1234)  # type: ignore[arg-type]
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    server.register_daemon("cache", proc)


def one_stage(worker: Any, **kwargs: Any) -> Server:
    server = Server()
    server.append_worker(worker, **kwargs)
    return server


class Request(Struct):
    media: str
    binary: bytes


class Typed(TypedMsgPackMixin, Worker):
    def forward(self, data: List[Request]) -> List[int]:
        return [len(req.binary) for req in data]


def test_typed_msgpack_mixin_validates_into_the_struct_and_names_the_field(
    start_worker: Any,
) -> None:
    agent: FakeAgent = start_worker(one_stage(Typed, max_batch_size=4))
    agent.ready()
    good = msgpack.packb({"media": "text", "binary": b"hello"})
    ok, missing, wrong, garbage = agent.batch(
        [
            good,
            msgpack.packb({"media": "none"}),
            msgpack.packb({"media": 1, "binary": b""}),
            b"\xc1",
        ]
    )
    assert ok.status == Status.OK and msgpack.unpackb(ok.body) == 5
    assert missing.status == Status.VALIDATION_ERROR
    assert b"binary" in missing.body, missing.body
    assert wrong.status == Status.VALIDATION_ERROR and b"media" in wrong.body, wrong.body
    assert garbage.status == Status.CLIENT_ERROR
    assert Typed.resp_mime_type == "application/msgpack"


def test_typed_mixin_json_schema_as_mosec_0_9() -> None:
    schema, components = Typed.get_forward_json_schema(
        ParseTarget.INPUT, "#/components/schemas/{name}"
    )
    assert schema == {"$ref": "#/components/schemas/Request"}
    assert set(components["Request"]["required"]) == {"media", "binary"}
    assert Pre.get_forward_json_schema(ParseTarget.INPUT, "{name}") == ({}, {})


class ArrayPre(NumBinIPCMixin, Worker):
    def forward(self, data: Dict[str, Any]) -> Any:
        num = int(data.get("num", 10))
        return np.ones(num) * (1 / num)


class ArrayInf(NumBinIPCMixin, Worker):
    def forward(self, data: List[Any]) -> List[str]:
        return ["equal" if np.isclose(1, arr.sum()) else "unequal" for arr in data]


def test_numbin_mixin_carries_arrays_between_stages(start_worker: Any) -> None:
    server = Server()
    server.append_worker(ArrayPre)
    server.append_worker(ArrayInf, max_batch_size=8)
    pre: FakeAgent = start_worker(server, stage=0)
    inf: FakeAgent = start_worker(server, stage=1)
    pre.ready()
    inf.ready()
    (mid,) = pre.batch([b'{"num": 8}'])
    assert mid.status == Status.OK
    (out,) = inf.batch([mid.body])
    assert out.status == Status.OK and out.body == b'"equal"'


def test_default_ipc_carries_numpy_arrays_and_scalars_without_pickle() -> None:
    worker = Pre.__new__(Pre)
    data = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)[:, 1:], "n": np.int64(3)}
    back = worker.deserialize_ipc(worker.serialize_ipc(data))
    assert back["n"] == 3 and type(back["n"]) is int
    assert back["x"].dtype == np.float32 and back["x"].tolist() == [[1.0, 2.0], [4.0, 5.0]]
    with pytest.raises(errors.EncodingError, match="object"):
        worker.serialize_ipc(np.array([object()]))


class FakeRedis:
    """The few redis-py calls RedisShmIPCMixin makes, over a dict."""

    def __init__(self) -> None:
        self.data: Dict[bytes, Any] = {}

    def incr(self, key: str) -> int:
        value = int(self.data.get(key.encode(), 0)) + 1
        self.data[key.encode()] = value
        return value

    def pipeline(self) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.calls: List[Any] = []

    def __enter__(self) -> FakePipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def set(self, key: bytes, value: bytes) -> None:
        self.calls.append(lambda: self.redis.data.__setitem__(key, value))

    def get(self, key: bytes) -> None:
        self.calls.append(lambda: self.redis.data.get(key))

    def delete(self, key: bytes) -> None:
        self.calls.append(lambda: self.redis.data.pop(key, None))

    def incr(self, key: str) -> None:
        self.calls.append(lambda: self.redis.incr(key))

    def execute(self) -> List[Any]:
        return [call() for call in self.calls]


class RedisStage(RedisShmIPCMixin, Worker):
    def forward(self, data: Any) -> Any:
        return data


def test_redis_mixin_puts_the_value_in_redis_and_sends_its_key() -> None:
    # Unit-tested with a fake client; tests/integration/test_mosec_services.py runs it
    # against a real redis-server when one is installed.
    fake = FakeRedis()
    sender, receiver = RedisStage.__new__(RedisStage), RedisStage.__new__(RedisStage)
    sender._redis_client = receiver._redis_client = fake
    key = sender.serialize_ipc({"x": np.arange(3)})
    assert key == b"1" and key in fake.data
    assert receiver.deserialize_ipc(key)["x"].tolist() == [0, 1, 2]
    assert key not in fake.data  # read once, then deleted
    assert sender.serialize_ipc("next") == b"2"
    with pytest.raises(errors.ServerError, match="no value under key"):
        receiver.deserialize_ipc(key)


def test_redis_url_is_checked() -> None:
    with pytest.raises(ValueError, match="set_redis_url: url must be a Redis URL"):
        RedisShmIPCMixin.set_redis_url("localhost")


def test_msgpack_mixin_declares_its_request_type() -> None:
    assert MsgpackMixin.req_mime_type == MsgpackMixin.resp_mime_type == "application/msgpack"


def test_mosec_flags_are_accepted() -> None:
    settings, rest = parse_settings(
        ["--max-request-size", "2048", "--capacity", "10", "--wait", "5", "--path", "/tmp/x",
         "--compression", "--debug", "--dry-run"],
        env={},
    )  # fmt: skip
    assert rest == []
    assert (settings.max_body_size, settings.log_level, settings.dry_run) == (2048, "debug", True)
    notices = mosec_flag_notices(settings)
    assert [n.split(" ")[0] for n in notices] == ["--path", "--capacity", "--wait", "--compression"]
    assert all("has no effect in natserve" in n for n in notices)
    assert parse_settings([], env={})[0].max_body_size == 10 * 1024 * 1024  # Mosec's default


def test_debug_does_not_override_an_explicit_log_level() -> None:
    settings, _ = parse_settings(["--debug", "--log-level", "error"], env={})
    assert settings.log_level == "error"


def test_unknown_flags_exit_64_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        check_script_flags(["file.txt", "--max-batch-size=8"], env={})
    assert info.value.code == 64
    err = capsys.readouterr().err
    assert (
        err.startswith("natserve: error: --max-batch-size: unknown flag") and err.count("\n") == 1
    )
    assert "NATSERVE_SCRIPT_FLAGS" in err


def test_flags_the_script_declares_are_left_for_it() -> None:
    env = {"NATSERVE_SCRIPT_FLAGS": "--sleep-duration, --worker-timeout"}
    check_script_flags(["--sleep-duration", "1.5", "--worker-timeout=1", "redis"], env=env)
    check_script_flags(["--anything", "-5"], env={"NATSERVE_SCRIPT_FLAGS": "*"})


def test_mosec_variables_are_read_after_natserve_ones() -> None:
    env = {
        "MOSEC_PORT": "9001",
        "MOSEC_TIMEOUT": "500",
        "MOSEC_MAX_REQUEST_SIZE": "77",
        "MOSEC_DEBUG": "true",
        "MOSEC_NAMESPACE": "mosec_service",
        "NATSERVE_PORT": "9002",
    }
    settings, _ = parse_settings([], env=env)
    assert (settings.port, settings.timeout, settings.max_body_size) == (9002, 500, 77)
    assert settings.log_level == "debug"
    assert settings.namespace == "natserve"  # Mosec's namespace names metrics, not NATS
    assert parse_settings(["--port", "9003"], env=env)[0].port == 9003


def test_a_bad_mosec_variable_exits_64_naming_the_flag_and_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings([], env={"MOSEC_PORT": "eighty"})
    assert info.value.code == 64
    err = capsys.readouterr().err
    assert err.startswith("natserve: error: --port:") and "(from MOSEC_PORT)" in err
