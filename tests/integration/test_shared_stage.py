"""A stage several routes share is one queue and one set of processes: its batches mix
the routes' requests, and each request goes on along its own route, decoded and encoded
as its own route places the stage (last on one route, first on the other)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Tuple

from harness import descendants, http, started_app

APP = Path(__file__).resolve().parent / "apps" / "shared_stage.py"


def worker_processes(pid: int) -> int:
    count = 0
    for child in descendants(pid):
        try:
            count += b"natserve._worker_main" in Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
    return count


def test_a_shared_stage_batches_both_routes_and_sends_each_on_its_way(tmp_path: Path) -> None:
    cluster, base, proc = started_app(tmp_path, APP)
    try:
        # AddOne, Double and Negate: Double once, though two routes name it.
        assert worker_processes(proc.pid) == 3

        def one(job: Tuple[str, int]) -> Tuple[str, int, int, Dict[str, Any]]:
            route, x = job
            r = http("POST", base + route, json.dumps({"x": x}).encode(), timeout=30)
            assert r.status == 200, (route, x, r)
            assert r.headers["content-type"] == "application/json"
            return route, x, r.status, r.json()  # type: ignore[return-value]

        # Four requests per route at once; Double waits up to 2 s to fill a batch of 8.
        jobs = [("/a", x) for x in range(4)] + [("/b", x) for x in range(10, 14)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(one, jobs))
        for route, x, _, body in answers:
            want = (x + 1) * 2 if route == "/a" else -(x * 2)
            assert body["x"] == want, (route, x, body)
        # Only four requests came on each route: a batch of more held both routes'.
        assert max(body["batch"] for *_, body in answers) > 4, answers

        # Each route still reports its own stage's ready workers.
        metrics = http("GET", base + "/metrics").text
        assert 'natserve_stage_workers{route="/a",stage="1"} 1' in metrics, metrics
        assert 'natserve_stage_workers{route="/b",stage="0"} 1' in metrics, metrics
    finally:
        cluster.stop_all()


def test_a_bad_body_on_the_route_where_the_shared_stage_decodes_http(tmp_path: Path) -> None:
    cluster, base, _ = started_app(tmp_path, APP)
    try:
        r = http("POST", base + "/b", b"{not json")
        assert r.status == 400, r
        assert r.text.startswith("decoding error"), r.text
        r = http("POST", base + "/a", b'{"x": 1}')
        assert (r.status, r.json()) == (200, {"x": 4, "batch": 1})
    finally:
        cluster.stop_all()


def test_the_python_client_takes_a_batchs_replies_in_one_envelope(tmp_path: Path) -> None:
    import asyncio

    import nats

    from harness import Cluster
    from natserve import Client

    cluster = Cluster(tmp_path)
    try:
        nats_url = cluster.nats()
        cluster.app(APP, "--role", "agent", "--nats", nats_url, name="agent")
        cluster.ingress(APP, nats_url)  # its readiness says the agent's workers are up

        async def run() -> Tuple[List[Dict[str, Any]], List[str]]:
            async with Client(nats_url) as client:
                spy = await nats.connect(nats_url)
                seen: List[str] = []

                async def note(msg: Any) -> None:
                    seen.append((msg.headers or {}).get("X-Envelope", "-"))

                await spy.subscribe(client.reply_prefix + ".*", cb=note)
                await spy.flush()
                bodies = [json.dumps({"x": x}).encode() for x in range(4)]
                answers = await asyncio.gather(
                    *(client.request(b, route="/a", timeout=20) for b in bodies)
                )
                await spy.close()
                return [json.loads(a) for a in answers], seen

        answers, seen = asyncio.run(run())
        assert [a["x"] for a in answers] == [(x + 1) * 2 for x in range(4)]
        # Double waits 2 s to fill a batch; the answers of any batch of several it ran
        # came in one message, an envelope.
        batched = [a["batch"] for a in answers if a["batch"] > 1]
        envelopes = [int(count) for count in seen if count != "-"]
        assert sum(envelopes) == len(batched), (answers, seen)
        assert len(seen) == len(answers) - len(batched) + len(envelopes), (answers, seen)
    finally:
        cluster.stop_all()
