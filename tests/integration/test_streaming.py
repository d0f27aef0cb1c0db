"""Streaming (SSEWorker) and cancellation through real processes: a nats-server, the
launcher, the Rust ingress and agent, and Python workers (apps/streams.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from harness import APPS, Cluster, EventStream, started_app

SCRIPT = APPS / "streams.py"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Cluster, str]]:
    tmp = tmp_path_factory.mktemp("streams")
    cluster, base, _ = started_app(tmp, SCRIPT, "--timeout", "2000")
    try:
        yield cluster, base
    finally:
        cluster.stop_all()


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_each_item_of_a_batch_streams_its_own_events(service: Tuple[Cluster, str]) -> None:
    _, base = service
    texts = ["a", "b", "c"]
    got: Dict[str, List[Tuple[str, str]]] = {}

    def ask(text: str) -> None:
        got[text] = EventStream(base + "/chat", body(text=text, count=4)).all()

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for text in texts:
        assert got[text] == [("message", f"{text}-{n}") for n in range(4)]


def test_an_exception_mid_stream_ends_it_with_an_error_event(
    service: Tuple[Cluster, str],
) -> None:
    _, base = service
    events = EventStream(base + "/chat", body(text="x", count=5, fail_after=2)).all()
    assert events == [
        ("message", "x-0"),
        ("message", "x-1"),
        (
            "error",
            "SSE inference error: 500: Internal Server Error: internal error: "
            "RuntimeError: boom after 2",
        ),
    ]


def test_a_bad_body_is_an_error_event_and_an_unknown_route_a_plain_404(
    service: Tuple[Cluster, str],
) -> None:
    _, base = service
    events = EventStream(base + "/chat", b"not json").all()
    assert len(events) == 1 and events[0][0] == "error"
    assert events[0][1].startswith("SSE inference error: 400: Bad Request: decoding error:")
    missing = EventStream(base + "/nowhere", b"{}")
    assert missing.status == 404
    missing.close()


def read_log(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_client_that_hangs_up_stops_generation_within_100_ms(
    service: Tuple[Cluster, str], tmp_path: Path
) -> None:
    """The worker makes one event every 10 ms and checks `is_cancelled()` before each: once
    the client hangs up, at most 10 more events (100 ms of generation) may be made."""
    _, base = service
    log = tmp_path / "generate.jsonl"
    stream = EventStream(base + "/generate", body(log=str(log)))
    seen = []
    for _, data in stream.events():
        seen.append(int(data))
        if len(seen) == 5:
            break
    hung_up = time.time()
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("cancelled" in r for r in read_log(log)):
        time.sleep(0.05)
    records = read_log(log)
    assert seen == [0, 1, 2, 3, 4]
    stops = [r for r in records if "cancelled" in r]
    assert stops, f"the worker never learned its client went away: {len(records)} events made"
    made_after = [r for r in records if "event" in r and r["at"] > hung_up]
    assert len(made_after) <= 10, f"{len(made_after)} events made after the hang-up"


def test_a_plain_worker_learns_its_client_went_away(
    service: Tuple[Cluster, str], tmp_path: Path
) -> None:
    _, base = service
    log = tmp_path / "wait.json"
    payload = body(log=str(log))
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /wait HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        time.sleep(0.3)  # running by now
        hung_up = time.time()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not log.exists():
        time.sleep(0.05)
    assert log.exists(), "the worker never learned its client went away"
    record = json.loads(log.read_text())
    assert "cancelled_at" in record, record
    assert record["cancelled_at"] - hung_up < 1.0


def test_a_stream_that_stalls_past_the_deadline_ends_with_an_error_event(
    service: Tuple[Cluster, str],
) -> None:
    """Last, as its worker is replaced (hung past its deadline). --timeout 2000 bounds the
    whole stream: the worker's 5 s pause after its first event ends the stream with a 504
    error event at about 2 s, not a hanging response."""
    _, base = service
    started = time.monotonic()
    events = EventStream(base + "/chat", body(text="s", count=2, stall_s=5), timeout=10).all()
    assert events[0] == ("message", "s-0")
    assert events[-1][0] == "error" and events[-1][1].startswith("SSE inference error: 504:")
    assert len(events) == 2
    assert time.monotonic() - started < 5
