"""Asynchronous jobs over HTTP (`Prefer: respond-async`, `GET /results/<id>`) and through
`natserve.Client`: results live in the results KV bucket, written by the agent that
finished the job, so any ingress answers and none has to stay alive for it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Dict, Optional

from harness import APPS, Cluster, Response, descendant_named, http
from natserve import Client
from natserve.errors import ServerError

BEHAVE = APPS / "behave.py"
ASYNC = {"Prefer": "respond-async"}


def submit(base: str, body: Dict[str, object], headers: Optional[Dict[str, str]] = None) -> str:
    r = http(
        "POST", base + "/inference", json.dumps(body).encode(), headers={**ASYNC, **(headers or {})}
    )
    assert r.status == 202, r
    answer = r.json()
    assert isinstance(answer, dict)
    assert r.headers["location"] == f"/results/{answer['id']}" == answer["location"]
    assert answer["state"] == "pending"
    return str(answer["id"])


def poll(base: str, result_id: str, within: float = 30.0) -> Response:
    """The first answer to GET /results/<id> that is not 202."""
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        r = http("GET", f"{base}/results/{result_id}")
        if r.status != 202:
            return r
        time.sleep(0.05)
    raise TimeoutError(f"result {result_id} still pending after {within} s")


def runs(log: Path, tag: str) -> int:
    return log.read_text().split().count(tag) if log.exists() else 0


def agent(cluster: Cluster, nats: str, log: Path) -> None:
    cluster.app(
        BEHAVE, "--role", "agent", "--nats", nats, name="agent", env={"BEHAVE_LOG": str(log)}
    )


def test_submit_on_one_ingress_and_read_on_another(cluster: Cluster, tmp_path: Path) -> None:
    nats = cluster.nats()
    log = tmp_path / "runs.log"
    agent(cluster, nats, log)
    first = cluster.ingress(BEHAVE, nats, name="ingress-1")
    second = cluster.ingress(BEHAVE, nats, name="ingress-2")
    result_id = submit(first, {"action": "sleep", "seconds": 1.0, "tag": "a"})
    pending = http("GET", f"{second}/results/{result_id}")
    assert pending.status == 202, pending
    assert pending.json() == {
        "id": result_id,
        "state": "pending",
        "location": f"/results/{result_id}",
    }
    done = poll(second, result_id)
    assert done.status == 200, done
    assert done.headers["content-type"] == "application/json"
    assert done.json()["echo"]["tag"] == "a"  # type: ignore[index]
    again = http("GET", f"{first}/results/{result_id}")
    assert (again.status, again.body) == (200, done.body)
    assert runs(log, "a") == 1
    # a job that fails keeps its status and message
    failed = poll(second, submit(first, {"action": "raise", "tag": "b"}))
    assert failed.status == 500, failed
    assert failed.text == "internal error: RuntimeError: boom"


def test_a_job_outlives_the_ingress_that_took_it(cluster: Cluster, tmp_path: Path) -> None:
    nats = cluster.nats()
    log = tmp_path / "runs.log"
    agent(cluster, nats, log)
    first = cluster.ingress(BEHAVE, nats, name="ingress-1")
    taker = cluster.procs[-1]
    result_id = submit(first, {"action": "sleep", "seconds": 2.0, "tag": "slow"})
    # The ingress dies hard while the job runs: no drain, no cancellation.
    os.kill(descendant_named(taker.pid, "natserve-ingress"), signal.SIGKILL)
    taker.stop()
    fresh = cluster.ingress(BEHAVE, nats, name="ingress-2")
    done = poll(fresh, result_id)
    assert done.status == 200, done
    assert done.json()["echo"]["tag"] == "slow"  # type: ignore[index]
    assert runs(log, "slow") == 1


def test_an_idempotent_retry_runs_once(cluster: Cluster, tmp_path: Path) -> None:
    nats = cluster.nats()
    log = tmp_path / "runs.log"
    agent(cluster, nats, log)
    base = cluster.ingress(BEHAVE, nats)
    key = {"Idempotency-Key": "order-1234"}
    body = {"action": "sleep", "seconds": 0.5, "tag": "once"}
    result_id = submit(base, body, key)
    retry = http("POST", base + "/inference", json.dumps(body).encode(), headers={**ASYNC, **key})
    assert retry.status == 202, retry
    assert retry.json() == {
        "id": result_id, "state": "pending", "location": f"/results/{result_id}", "repeated": True,
    }  # fmt: skip
    assert poll(base, result_id).status == 200
    # after it finished, too, and from natserve.Client with the same key and route
    assert submit(base, body, key) == result_id

    async def client_side() -> None:
        async with Client(nats) as client:
            assert (
                await client.submit(json.dumps(body).encode(), idempotency_key="order-1234")
                == result_id
            )
            answer = await client.result(result_id)
            assert answer is not None and json.loads(answer)["echo"]["tag"] == "once"

    asyncio.run(client_side())
    assert runs(log, "once") == 1
    other = submit(base, {"action": "echo", "tag": "twice"}, {"Idempotency-Key": "order-1235"})
    assert other != result_id


def test_results_expire_after_their_ttl(cluster: Cluster, tmp_path: Path) -> None:
    nats = cluster.nats()
    agent(cluster, nats, tmp_path / "runs.log")
    base = cluster.ingress(BEHAVE, nats, "--result-ttl-s", "1", "--async-timeout-ms", "1000")
    result_id = submit(base, {"action": "echo"})
    assert poll(base, result_id).status == 200
    gone = poll_until_status(base, result_id, 404, within=15.0)
    assert (
        gone.text
        == f"no result {result_id}: the id is unknown, or its record expired (its TTL passed)"
    )


def poll_until_status(base: str, result_id: str, status: int, within: float) -> Response:
    give_up = time.monotonic() + within
    while True:
        r = http("GET", f"{base}/results/{result_id}")
        if r.status == status or time.monotonic() > give_up:
            return r
        time.sleep(0.2)


def test_bad_requests_get_a_clear_4xx(cluster: Cluster, tmp_path: Path) -> None:
    nats = cluster.nats()
    agent(cluster, nats, tmp_path / "runs.log")
    base = cluster.ingress(BEHAVE, nats)
    r = http("GET", base + "/results/no-such-job")
    assert (r.status, r.text) == (
        404, "no result no-such-job: the id is unknown, or its record expired (its TTL passed)"
    )  # fmt: skip
    r = http("GET", base + "/results/a.b")
    assert r.status == 400 and "is not one" in r.text, r
    r = http("POST", base + "/results/abc", b"{}")
    assert (r.status, r.headers["allow"]) == (405, "GET"), r
    r = http("POST", base + "/inference", b"{}", headers={"Idempotency-Key": "k"})
    assert r.status == 400 and "Prefer: respond-async" in r.text, r
    r = http("POST", base + "/inference", b"{}", headers={**ASYNC, "Idempotency-Key": "\u00e9"})
    assert r.status == 400 and "Idempotency-Key" in r.text, r


def test_a_job_whose_worker_crashes_reads_500(cluster: Cluster, tmp_path: Path) -> None:
    nats = cluster.nats()
    agent(cluster, nats, tmp_path / "runs.log")
    base = cluster.ingress(BEHAVE, nats)
    r = poll(base, submit(base, {"action": "crash"}))
    assert r.status == 500, r
    assert r.text.startswith("internal error: worker process failed"), r


def test_client_submits_and_reads_results(cluster: Cluster, tmp_path: Path) -> None:
    nats = cluster.nats()
    agent(cluster, nats, tmp_path / "runs.log")
    base = cluster.ingress(BEHAVE, nats)

    async def main() -> None:
        async with Client(nats) as client:
            result_id = await client.submit(b'{"action": "sleep", "seconds": 0.5, "tag": "c"}')
            assert await client.result(result_id) is None  # still running
            body = await client.result(result_id, wait=20.0)
            assert body is not None and json.loads(body)["echo"]["tag"] == "c"
            failed = await client.submit(b'{"action": "raise"}')
            try:
                await client.result(failed, wait=20.0)
            except ServerError as err:
                assert str(err) == "internal error: RuntimeError: boom"
            else:
                raise AssertionError("a failed job must raise")
            try:
                await client.result("no-such-job")
            except LookupError:
                pass
            else:
                raise AssertionError("an unknown id must raise LookupError")
            # the ingress reads what the client submitted
            assert http("GET", f"{base}/results/{result_id}").json()["echo"]["tag"] == "c"  # type: ignore[index]

    asyncio.run(main())
