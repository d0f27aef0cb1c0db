"""Bodies larger than a NATS message travel as claim checks through the payloads object
store (README, "Large payloads"): requests, intermediate results and final results, each
object deleted once consumed; over --max-body-size is 413 at once, and a result that
cannot be stored is a 500 at once, never a 504 at the deadline.

Every nats-server here allows 1 MB messages, so anything bigger must take the store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from http.client import HTTPConnection
from typing import Any, Optional, Tuple

import nats

from harness import APPS, Cluster, http
from natserve import Client
from natserve.errors import ServerError

BULK = APPS / "bulk.py"
BUCKET = "natserve_payloads"
MB = 1024 * 1024


def pipeline(
    cluster: Cluster, *, max_memory_store: Optional[str] = None, **env: str
) -> Tuple[str, str]:
    """`bulk.py`'s two stages on two agents and an ingress, sharing one 1 MB nats-server."""
    nats_url = cluster.nats(max_payload="1MB", max_memory_store=max_memory_store)
    for stage in ("Flip", "Stamp"):
        cluster.app(
            BULK, "--role", "agent", "--nats", nats_url, "--stages", stage,
            name=f"agent-{stage}", env=env,
        )  # fmt: skip
    base = cluster.ingress(BULK, nats_url, "--max-body-size", str(25 * MB), "--timeout", "30000")
    return nats_url, base


def stored_objects(nats_url: str) -> Tuple[int, int]:
    """(objects, messages) in the payloads bucket: what is listed, and what its stream
    still holds (chunks, metadata and tombstones alike)."""

    async def inspect() -> Tuple[int, int]:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            store = await js.object_store(BUCKET)
            try:
                listed = await store.list(ignore_deletes=True)
            except nats.js.errors.NotFoundError:
                listed = []
            info = await js.stream_info(f"OBJ_{BUCKET}")
            return len(listed), info.state.messages
        finally:
            await nc.close()

    return asyncio.run(inspect())


def wait_empty(nats_url: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := stored_objects(nats_url)) != (0, 0):
        assert time.monotonic() < deadline, f"payloads left in {BUCKET}: {left}"
        time.sleep(0.1)


def test_20_mb_through_two_stages_on_two_agents(cluster: Cluster) -> None:
    nats_url, base = pipeline(cluster)
    body = os.urandom(20 * 1000 * 1000)
    started = time.monotonic()
    r = http("POST", base + "/inference", body, timeout=60)
    took = time.monotonic() - started
    assert r.status == 200, r
    # Each hop (request, intermediate, reply) was 20 times over the message limit.
    assert hashlib.sha256(r.body).hexdigest() == hashlib.sha256(body + b"|stamped").hexdigest()
    assert took < 20, took
    # Every object is deleted once its consumer is done with it, tombstones included.
    wait_empty(nats_url)

    # Small requests still go inline, beside large ones.
    small = http("POST", base + "/inference", b"abc")
    assert (small.status, small.body) == (200, b"abc|stamped"), small
    wait_empty(nats_url)


def test_over_the_max_body_size_is_413_at_once(cluster: Cluster) -> None:
    _, base = pipeline(cluster)
    host, port = base.removeprefix("http://").split(":")
    started = time.monotonic()
    # The answer comes before the body is sent: it is refused on its declared length.
    conn = HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/inference")
    conn.putheader("Content-Length", str(25 * MB + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413, r.status
    assert "--max-body-size" in r.read().decode()
    conn.close()
    assert time.monotonic() - started < 5
    # Streamed without a length, it is cut off once it passes the limit.
    conn = HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/inference")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"x" * MB
    with contextlib.suppress(OSError):  # the ingress may close while we still send
        for _ in range(26):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    r = conn.getresponse()
    assert r.status == 413, r.status
    conn.close()
    assert time.monotonic() - started < 10


def test_a_result_that_cannot_be_stored_is_500_at_once(cluster: Cluster) -> None:
    # JetStream may keep 32 MB in memory; each stage makes a 48 MB result when asked.
    nats_url, base = pipeline(cluster, max_memory_store="32MB", BULK_HUGE_BYTES=str(48 * MB))
    for body, stage in ((b"huge-mid", "stage 0"), (b"huge-end", "")):
        started = time.monotonic()
        r = http("POST", base + "/inference", body)
        took = time.monotonic() - started
        assert r.status == 500, r
        assert "could not" in r.text and "payloads" in r.text, r
        assert stage in r.text, r
        assert took < 5, f"answered after {took:.1f} s of a 30 s deadline"
        # The chunks a failed put wrote are the bucket's max age's to remove (README,
        # "Not there yet"); until then they hold JetStream's memory, so the test purges.
        asyncio.run(purge(nats_url))
    # Still serving, large bodies included.
    body = os.urandom(3 * MB)
    r = http("POST", base + "/inference", body)
    assert (r.status, r.body == body + b"|stamped") == (200, True), r


async def purge(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().purge_stream(f"OBJ_{BUCKET}")
    finally:
        await nc.close()


def test_the_python_client_sends_and_receives_claim_checks(cluster: Cluster) -> None:
    nats_url, _ = pipeline(cluster)
    body = os.urandom(3 * MB)

    async def run() -> Any:
        async with Client(nats_url) as client:
            answer = await client.request(body, timeout=30)
            small = await client.request(b"xyz", timeout=10)
            return answer, small

    answer, small = asyncio.run(run())
    assert answer == body + b"|stamped"
    assert small == b"xyz|stamped"
    wait_empty(nats_url)


def test_the_python_client_raises_for_a_result_that_cannot_be_stored(cluster: Cluster) -> None:
    nats_url, _ = pipeline(cluster, max_memory_store="32MB", BULK_HUGE_BYTES=str(48 * MB))

    async def run() -> float:
        async with Client(nats_url) as client:
            started = time.monotonic()
            try:
                await client.request(b"huge-end", timeout=30)
            except ServerError as err:
                assert "could not" in str(err), err
                return time.monotonic() - started
        raise AssertionError("no ServerError")

    assert asyncio.run(run()) < 5
