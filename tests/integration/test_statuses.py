"""Every status of the DESIGN table not covered by the exp example: worker errors and
crashes, queue full, deadline passed, no agent."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import APPS, Cluster, free_port, http, wait_ready

BEHAVE = APPS / "behave.py"


def post(base: str, payload: object):  # type: ignore[no-untyped-def]
    return http("POST", base + "/inference", json.dumps(payload).encode())


def start(cluster: Cluster, *flags: str, env=None) -> str:  # type: ignore[no-untyped-def]
    port = free_port()
    proc = cluster.app(BEHAVE, "--port", str(port), "--address", "127.0.0.1", *flags, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc)
    return base


def test_raising_worker_is_500_without_traceback(cluster: Cluster) -> None:
    base = start(cluster)
    r = post(base, {"action": "raise"})
    assert r.status == 500
    assert r.text == "internal error: RuntimeError: boom"
    assert post(base, {"action": "echo"}).status == 200


def test_crashing_worker_is_500_and_is_restarted(cluster: Cluster) -> None:
    base = start(cluster, "--timeout", "20000")
    before = post(base, {"action": "echo"}).json()
    r = post(base, {"action": "crash"})
    assert r.status == 500, r
    after = post(base, {"action": "echo"})
    assert after.status == 200, after
    assert after.json()["pid"] != before["pid"]  # type: ignore[index]


def test_passed_deadline_is_504(cluster: Cluster) -> None:
    base = start(cluster, "--timeout", "500")
    started = time.monotonic()
    r = post(base, {"action": "sleep", "seconds": 2})
    assert r.status == 504, r
    assert time.monotonic() - started < 1.9
    # Work queued behind the slow request expired too, and was answered, not run.
    assert post(base, {"action": "echo"}).status in (200, 504)


def test_a_batch_past_its_stage_timeout_is_504_and_the_worker_replaced(cluster: Cluster) -> None:
    base = start(cluster, "--timeout", "20000", env={"BEHAVE_TIMEOUT_MS": "500"})
    before = post(base, {"action": "echo"}).json()
    started = time.monotonic()
    r = post(base, {"action": "sleep", "seconds": 30})
    assert r.status == 504, r
    assert "did not finish within 500 ms" in r.text
    assert time.monotonic() - started < 10
    after = post(base, {"action": "echo"})
    assert after.status == 200, after
    assert after.json()["pid"] != before["pid"]  # type: ignore[index]


def test_a_queued_request_whose_client_went_away_never_runs(
    cluster: Cluster, tmp_path: Path
) -> None:
    ran = tmp_path / "ran.log"
    base = start(cluster, "--timeout", "10000", env={"BEHAVE_LOG": str(ran)})
    port = int(base.rsplit(":", 1)[1])
    busy = threading.Thread(
        target=post, args=(base, {"action": "sleep", "seconds": 3, "tag": "busy"})
    )
    busy.start()
    time.sleep(0.3)
    body = json.dumps({"action": "echo", "tag": "gone"}).encode()
    for _ in range(3):
        # Queued behind the busy worker; the client hangs up before any answer.
        with socket.create_connection(("127.0.0.1", port)) as conn:
            head = f"POST /inference HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
            conn.sendall(head.encode() + body)
            time.sleep(0.1)
    busy.join()
    assert post(base, {"action": "echo", "tag": "after"}).status == 200
    lines = ran.read_text().split()
    assert "busy" in lines and "after" in lines, lines
    assert "gone" not in lines, lines


def test_full_queue_is_429(cluster: Cluster) -> None:
    base = start(cluster, "--timeout", "5000", env={"NATSERVE_MAX_QUEUE": "2"})

    def one(i: int) -> int:
        # Apart in time: each goes as a message of its own, not in one envelope with the
        # others (the queue bound counts messages).
        time.sleep(0.1 * i)
        return post(base, {"action": "sleep", "seconds": 0.5}).status

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(8)))
    assert 429 in statuses, statuses
    assert 200 in statuses, statuses
    assert set(statuses) <= {200, 429}, statuses


def test_no_agent_is_503(cluster: Cluster, tmp_path: Path) -> None:
    nats = cluster.nats()
    agent = cluster.app(BEHAVE, "--role", "agent", "--nats", nats, name="agent")
    port = free_port()
    ingress = cluster.app(
        BEHAVE, "--role", "ingress", "--nats", nats, "--port", str(port), name="ingress"
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, ingress)
    assert post(base, {"action": "echo"}).status == 200
    assert agent.stop() == 0
    # It deregistered on its way out: 503 at once, not after its heartbeat went stale.
    r = post(base, {"action": "echo"})
    assert r.status == 503, r
    assert http("GET", base + "/").status == 503
