"""What an operator sees: the first minute (the port opens when the service is ready, and
the launcher says so), one request followed through every process's JSON log by its
request id and trace id, and metrics that `promtool check metrics` accepts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from harness import APPS, EXAMPLES, Cluster, Proc, Response, free_port, http, started_app

EXP = EXAMPLES / "exp.py"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_the_port_opens_when_every_stage_is_ready_and_the_launcher_says_so(
    tmp_path: Path,
) -> None:
    # A heartbeat far longer than the test may take: readiness that waited for the next
    # heartbeat would never come in time.
    c = Cluster(tmp_path)
    port = free_port()
    proc = c.app(EXP, "--port", str(port), "--address", "127.0.0.1", "--heartbeat-ms", "600000")
    try:
        seen: List[object] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.popen.poll() is None, proc.output()[-4000:]
            try:
                answer = http("GET", f"http://127.0.0.1:{port}/", timeout=2)
            except OSError:
                time.sleep(0.05)
                continue
            seen.append(answer.status)
            if answer.status == 200:
                break
        assert seen and seen[-1] == 200, f"never ready: {seen}\n{proc.output()[-4000:]}"
        # The port opened when GET / could answer 200: no 503 "no ready worker" first.
        assert seen == [200], seen
        line = f"natserve ready on http://127.0.0.1:{port} (routes: /inference)"
        wait_for_line(proc, line)
        log = proc.output()
        assert log.count("natserve ready on") == 1
        assert log.index("worker ready") < log.index(line)
    finally:
        c.stop_all()


def wait_for_line(proc: Proc, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.output():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{proc.output()[-4000:]}"
        time.sleep(0.05)


def json_lines(proc: Proc) -> List[Dict[str, Any]]:
    """Every line of the process's log, each of which must be one JSON object (the
    launcher's, the ingress's, the agent's and the workers'; nats-server logs elsewhere)."""
    lines = []
    for line in proc.output().splitlines():
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(parsed, dict), line
        lines.append(parsed)
    return lines


@pytest.fixture(scope="module")
def ids_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Cluster, str, Proc]]:
    tmp = tmp_path_factory.mktemp("ids")
    c, base, proc = started_app(
        tmp, APPS / "ids.py", "--log-level", "debug", env={"NATSERVE_LOG_FORMAT": "json"}
    )
    try:
        yield c, base, proc
    finally:
        c.stop_all()


def test_one_request_is_followed_through_every_log_by_its_ids(
    ids_app: Tuple[Cluster, str, Proc],
) -> None:
    _, base, proc = ids_app
    r = http(
        "POST",
        base + "/inference",
        b'{"x": 1}',
        headers={"X-Request-Id": "follow-me-1", "traceparent": TRACEPARENT},
    )
    assert r.status == 200, r
    assert r.headers["x-request-id"] == "follow-me-1"
    answer = r.json()
    assert isinstance(answer, dict)
    # On the wire the caller's id gets a suffix (a retry with the same id is a new request).
    (wire_id,) = answer["request_ids"]
    assert re.fullmatch(r"follow-me-1-[0-9a-f]{8}", wire_id), wire_id
    assert answer["trace_ids"] == [TRACE_ID]

    time.sleep(0.5)  # the last lines are written after the reply
    lines = json_lines(proc)
    ingress = [
        line
        for line in lines
        if line.get("target", "").startswith("natserve_ingress")
        and line.get("span", {}).get("request_id") == wire_id
    ]
    assert ingress, "no ingress line about the request"
    assert all(line["span"]["trace_id"] == TRACE_ID for line in ingress)
    agent = [
        line
        for line in lines
        if line.get("target", "").startswith("natserve_scheduler")
        and line.get("request_ids") == wire_id
    ]
    assert len(agent) >= 2, "no agent line about each stage's batch"
    assert all(line["trace_ids"] == TRACE_ID for line in agent)
    workers = [line for line in lines if line.get("request_id") == wire_id]
    own = [line["message"] for line in workers if "stage sees" in line["message"]]
    assert own == [
        f"first stage sees ['{wire_id}'] ['{TRACE_ID}']",
        f"second stage sees ['{wire_id}'] ['{TRACE_ID}']",
    ]
    assert all(line["trace_id"] == TRACE_ID for line in workers)
    assert any(line.get("target") == "natserve.launcher" for line in lines)


def test_a_request_without_traceparent_has_no_trace_id(
    ids_app: Tuple[Cluster, str, Proc],
) -> None:
    _, base, _ = ids_app
    r = http("POST", base + "/inference", b'{"x": 1}')
    assert r.status == 200, r
    answer = r.json()
    assert isinstance(answer, dict)
    assert answer["request_ids"] == [r.headers["x-request-id"]]
    assert answer["trace_ids"] == [""]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def test_promtool_accepts_the_ingress_and_agent_metrics(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; make install adds it)")
    metrics_port = free_port()
    c, base, _ = started_app(tmp_path, EXP, "--metrics-address", f"127.0.0.1:{metrics_port}")
    try:
        for _ in range(3):
            assert http("POST", base + "/inference", b'{"x": 2}').status == 200
        assert http("POST", base + "/inference", b'{"y": 2}').status == 422
        scrapes = {
            "ingress": scrape(base + "/metrics"),
            "agent": scrape(f"http://127.0.0.1:{metrics_port}/metrics"),
        }
        for name, text in scrapes.items():
            checked = subprocess.run(
                [promtool, "check", "metrics"],
                input=text.encode(),
                capture_output=True,
                timeout=30,
            )
            problems = (checked.stdout + checked.stderr).decode()
            assert checked.returncode == 0 and not problems.strip(), f"{name}: {problems}"
            assert re.search(
                rf'natserve_build_info{{component="{name}",version="[^"]+"}} 1', text
            ), text
        agent = scrapes["agent"]
        count = re.search(
            r'natserve_agent_queue_wait_seconds_count{route="/inference",stage="0"} (\d+)', agent
        )
        assert count and int(count.group(1)) == 4, agent
        assert "natserve_agent_batch_duration_seconds_count" in agent
    finally:
        c.stop_all()


def test_retry_after_comes_with_every_503(tmp_path: Path) -> None:
    # An ingress alone, with no agent: GET / and every POST answer 503.
    c = Cluster(tmp_path)
    nats = c.nats()
    port = free_port()
    c.app(EXP, "--role", "ingress", "--nats", nats, "--port", str(port), "--address", "127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        answer: object = None
        while time.monotonic() < deadline:
            try:
                answer = http("GET", base + "/", timeout=2)
                break
            except OSError:
                time.sleep(0.05)
        assert isinstance(answer, Response) and answer.status == 503, answer
        assert answer.headers["retry-after"] == "1"
        post = http("POST", base + "/inference", b'{"x": 2}')
        assert post.status in (404, 503), post
        if post.status == 503:
            assert post.headers["retry-after"] == "1"
    finally:
        c.stop_all()
