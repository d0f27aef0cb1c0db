"""`docker compose up` end to end: the repository's docker-compose.yml, with only the
test override (tests/compose/docker-compose.test.yml) on top, serves, scales, drains on
SIGTERM, survives a killed worker, and `down` leaves nothing behind.

Images are built locally (compose_images.py: no registry is reachable here). Skipped,
with the reason on the summary line, when no Docker engine is reachable. The tests run
in file order against one stack.
"""

from __future__ import annotations

import subprocess
import time
from typing import Dict, Iterator, List

import pytest

from compose_stack import Load, Stack, http, parse_metric, unavailable_reason

REASON = unavailable_reason()
if REASON:
    pytest.skip(f"SKIP: compose test not run: {REASON}", allow_module_level=True)

import compose_images  # noqa: E402 (only once Docker is known to be there)

# The ingress answers 504 at its deadline (NATSERVE_TIMEOUT in docker-compose.yml).
DEADLINE_S = 3.0
# What a client may wait beyond the deadline before calling a request hung.
MARGIN_S = 2.0


@pytest.fixture(scope="module")
def stack(pytestconfig: pytest.Config) -> Iterator[Stack]:
    reporter = pytestconfig.pluginmanager.getplugin("terminalreporter")
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(message: str) -> None:
        """Progress on the terminal as it happens, even with output captured."""
        if reporter is None or capture is None:
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[compose] {message}")

    with compose_images.exclusive(log=say):
        started = time.monotonic()
        images = compose_images.build_all(log=say)
        say(f"images ready in {time.monotonic() - started:.0f} s: {images.natserve}, {images.nats}")
        s = Stack(compose_images.env_for(images), log_file=compose_images.CACHE / "last-stack.log")
        say(f"project {s.project} with {' '.join(s.command)}, ingress on {s.base_url}")
        try:
            up_at = time.monotonic()
            s.up()
            s.wait_ready()
            say(f"stack serving in {time.monotonic() - up_at:.0f} s")
            yield s
        finally:
            s.down()
            took = time.monotonic() - started
            say(f"stack down, its logs in {s.log_file}; {took:.0f} s in all")


def agent_items(stack: Stack, containers: List[str]) -> Dict[str, float]:
    """Items each agent ran through its first stage, by container."""
    return {
        c: parse_metric(stack.agent_metrics(c), "natserve_agent_items_total", stage="0")
        for c in containers
    }


def test_serves_requests_on_the_published_port(stack: Stack) -> None:
    resp = http("POST", stack.base_url + "/inference", b'{"x": 2}')
    assert resp.status == 200, resp
    assert resp.json() == {"x": 2.0, "y": 4.0, "batch": 1}
    bad = http("POST", stack.base_url + "/inference", b'{"input": 2}')
    assert (bad.status, bad.body) == (422, b"validation error: cannot find key 'x'")
    assert http("GET", stack.base_url + "/").body == b"ok"
    metrics = http("GET", stack.base_url + "/metrics").body.decode()
    assert parse_metric(metrics, "natserve_requests_total", status="200") >= 1
    # Healthchecks mean ready, and nothing runs as root.
    for service in ("nats", "ingress", "worker"):
        stack.wait_healthy(service, 1)
    for service in ("ingress", "worker"):
        (container,) = stack.containers(service)
        uid = subprocess.run(
            ["docker", "exec", container, "id", "-u"], capture_output=True, text=True, check=True
        )
        assert uid.stdout.strip() == "10001", f"{service} runs as uid {uid.stdout.strip()}"


def test_scaled_workers_both_do_work(stack: Stack) -> None:
    stack.up("--scale", "worker=2")
    workers = stack.wait_healthy("worker", 2)
    # The ingress sees both agents' workers (2 Preprocess processes each).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = http("GET", stack.base_url + "/metrics").body.decode()
        if parse_metric(metrics, "natserve_stage_workers", stage="0") == 4:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"ingress does not count both agents' workers:\n{metrics}")
    before = agent_items(stack, workers)
    with Load(stack.base_url + "/inference", threads=16, timeout=DEADLINE_S + MARGIN_S) as load:
        while len(load.outcomes) < 400:
            time.sleep(0.1)
    after = agent_items(stack, workers)
    statuses = [o.status for o in load.outcomes]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    assert not [o.error for o in load.outcomes if o.error]
    done = {c[:12]: after[c] - before[c] for c in workers}
    print(f"items per worker container: {done}")
    assert all(n > 0 for n in done.values()), done
    assert sum(done.values()) >= len(statuses)


def test_sigterm_drains_a_worker_under_load(stack: Stack) -> None:
    workers = stack.wait_healthy("worker", 2)
    with Load(stack.base_url + "/inference", threads=8, timeout=DEADLINE_S + MARGIN_S) as load:
        time.sleep(1.5)
        started = time.monotonic()
        # What `docker compose stop` and scaling down do: SIGTERM, SIGKILL after the
        # service's stop_grace_period (40 s).
        stopped = subprocess.run(
            ["docker", "stop", "-t", "40", workers[0]], capture_output=True, text=True
        )
        stop_s = time.monotonic() - started
        time.sleep(2)
    assert stopped.returncode == 0, stopped.stderr
    assert stack.inspect(workers[0], "{{.State.ExitCode}}") == "0"
    statuses = [o.status for o in load.outcomes]
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"SIGTERM stop took {stop_s:.1f} s; statuses {counts}")
    assert statuses.count(200) == len(statuses), counts
    # Back to two workers for the next test.
    stack.up("--scale", "worker=2")
    stack.wait_healthy("worker", 2)


def test_killing_a_worker_under_load_leaves_no_request_hanging(stack: Stack) -> None:
    workers = stack.wait_healthy("worker", 2)
    with Load(stack.base_url + "/inference", threads=8, timeout=DEADLINE_S + 10) as load:
        time.sleep(2)
        killed_at = time.monotonic()
        subprocess.run(["docker", "kill", workers[0]], check=True, capture_output=True)
        time.sleep(DEADLINE_S + 3)
    outcomes = load.outcomes
    statuses = [o.status for o in outcomes]
    counts = {s: statuses.count(s) for s in set(statuses)}
    slowest = max(o.elapsed for o in outcomes)
    print(
        f"killed a worker under load: {len(outcomes)} requests, {counts}, slowest {slowest:.2f} s"
    )
    # Every request got an HTTP answer, none later than its deadline plus a margin: the
    # killed agent's unacked items are answered 504 at their deadline.
    assert None not in statuses, [o.error for o in outcomes if o.status is None][:5]
    assert slowest <= DEADLINE_S + MARGIN_S, slowest
    assert set(statuses) <= {200, 504}, counts
    assert statuses.count(200) >= 0.9 * len(statuses), counts
    # Requests that arrived after the kill went to the surviving worker.
    later = [o.status for o in outcomes if o.started > killed_at + 0.5]
    assert later and later.count(200) == len(later), {s: later.count(s) for s in set(later)}
    assert not [o.error for o in outcomes if o.error]


def test_down_leaves_nothing(stack: Stack) -> None:
    stack.down()
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
