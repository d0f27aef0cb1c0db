"""Ingresses and agents share nothing but NATS: each runs as its own process with its own
socket directory, as on separate machines."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from harness import APPS, EXAMPLES, Cluster, http

PIPELINE = EXAMPLES / "pipeline.py"
BEHAVE = APPS / "behave.py"


def test_stages_of_one_pipeline_on_different_agents(cluster: Cluster) -> None:
    nats = cluster.nats()
    cluster.app(
        PIPELINE, "--role", "agent", "--nats", nats, "--stages", "Preprocess", name="agent-a"
    )
    cluster.app(
        PIPELINE, "--role", "agent", "--nats", nats, "--stages", "Inference", name="agent-b"
    )
    base = cluster.ingress(PIPELINE, nats)
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(
                lambda i: (i, http("POST", base + "/inference", json.dumps({"x": i}).encode())),
                range(64),
            )
        )
    for i, r in results:
        assert r.status == 200, r
        assert r.json()["y"] == 2 * i  # type: ignore[index]


def test_two_agents_of_one_stage_share_the_work(cluster: Cluster) -> None:
    nats = cluster.nats()
    cluster.app(BEHAVE, "--role", "agent", "--nats", nats, name="agent-1")
    cluster.app(BEHAVE, "--role", "agent", "--nats", nats, name="agent-2")
    base = cluster.ingress(BEHAVE, nats)
    # Ready means a worker of the stage is up somewhere; wait until both agents answered.
    body = json.dumps({"action": "sleep", "seconds": 0.05}).encode()
    agents = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            rs = list(pool.map(lambda _: http("POST", base + "/inference", body), range(16)))
            assert all(r.status == 200 for r in rs), rs
            agents |= {r.json()["agent"] for r in rs}  # type: ignore[index]
            if len(agents) == 2:
                break
    assert len(agents) == 2, agents


def test_two_ingresses_serve_the_same_routes(cluster: Cluster) -> None:
    nats = cluster.nats()
    cluster.app(BEHAVE, "--role", "agent", "--nats", nats, name="agent")
    first = cluster.ingress(BEHAVE, nats, name="ingress-1")
    second = cluster.ingress(BEHAVE, nats, name="ingress-2")
    for base in (first, second):
        r = http("POST", base + "/inference", b'{"action": "echo"}')
        assert r.status == 200, r
