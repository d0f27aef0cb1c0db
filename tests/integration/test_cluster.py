"""natserve on a three-node NATS cluster: every queue and bucket kept on three servers by
JetStream (`--replicas 3`), every process given all three URLs, one node killed
(`kill -9`) under load. Nothing accepted is lost and natserve keeps serving: a request
is either answered 200 with its own answer or refused at once with 503 (the ingress could
not queue it: its node was gone), only in the seconds after the kill. The node that dies
leads what the test says (JetStream's leader step-down moves leaders there first), so
each run meets the case it names. Each test prints the figures the README's "What
survives what" quotes, with when each leader the dead node held was elected again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional

import nats
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from harness import APPS, Cluster, NatsNode, Response, http

BEHAVE = APPS / "behave.py"
#: Concurrent HTTP clients of the steady load.
CLIENTS = 16
#: How long the load runs before the kill, and after it.
BEFORE_KILL_S = 1.5
AFTER_KILL_S = 22.0
#: The 503s of a request the ingress could not queue (so never accepted): its NATS
#: connection was down, or the stage's stream had no leader ("no stream") or gave no
#: publish ack until the deadline. Not among them: "no agent serves stage 0", which would
#: be live agents counted gone because their bucket had no leader.
REFUSALS = (
    b"nats is unavailable",
    b"/inference is not served",
)
#: Refusals stop by then after the kill: JetStream has elected new leaders for the
#: streams the dead node led (a follower waits 4 to 9 s without a leader's heartbeat
#: before it stands for election).
REFUSED_WITHIN_S = 15.0
#: A client told 503 tries again after this long, as a well-behaved one does.
BACKOFF_S = 0.1
#: What natserve makes in JetStream for the behave app, in namespace natserve.
STREAMS = (
    "natserve_work_inference_0",
    "KV_natserve_routes",
    "KV_natserve_agents",
    "KV_natserve_results",
)


@dataclass
class Outcome:
    tag: int
    started: float
    ended: float
    response: Optional[Response]
    error: str = ""

    @property
    def ok(self) -> bool:
        r = self.response
        return r is not None and r.status == 200 and r.json()["echo"]["tag"] == self.tag  # type: ignore[index]

    @property
    def refused(self) -> bool:
        r = self.response
        return r is not None and r.status == 503 and r.body.startswith(REFUSALS)


def stream_replicas(node: NatsNode) -> Dict[str, int]:
    """Each stream `node` hosts and the replicas its configuration asks for."""
    jsz = node.monitoring("/jsz?accounts=true&streams=true&config=true")
    assert isinstance(jsz, dict)
    found = {}
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            found[stream["name"]] = int(stream["config"].get("num_replicas", 1))
    return found


#: The first stage's durable consumer, which every agent pulls (a raft group of its own).
CONSUMER = (STREAMS[0], "workers")
#: How often the election watch asks a surviving node who leads what.
ELECTION_POLL_S = 0.1
#: The deadline (`--timeout`, ms) the node-kill tests run at: longer than JetStream takes
#: to elect new leaders after a node died (a follower waits 4 to 9 s without a leader's
#: heartbeat before it stands; 3.1 to 8.4 s measured), plus the agents' next pull (within
#: a second of the election) and a redelivery. At natserve's default (3 s) a request
#: queued when the work queue's leader died cannot be answered in time. 10 s held in
#: most runs measured; once the work consumer's election took 13.3 s (a vote that did
#: not settle the first time, then a second wait), and 12 s cost 11 requests: 20 s.
NODE_KILL_TIMEOUT_MS = 20000


def leaders(node: NatsNode) -> Dict[str, str]:
    """Who leads each of natserve's streams and the first stage's consumer, as `node` sees
    it ("" for none); the consumer under the key ``"<stream> > <consumer>"``."""
    jsz = node.monitoring("/jsz?accounts=true&streams=true&consumers=true")
    assert isinstance(jsz, dict)
    found: Dict[str, str] = {}
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            found[stream["name"]] = (stream.get("cluster") or {}).get("leader") or ""
            for consumer in stream.get("consumer_detail") or []:
                key = f"{stream['name']} > {consumer['name']}"
                found[key] = (consumer.get("cluster") or {}).get("leader") or ""
    return found


def move_leader(nodes: List[NatsNode], name: str, to: NatsNode) -> None:
    """Makes `to` the leader of stream `name` (or consumer ``"<stream> > <consumer>"``):
    JetStream's leader step-down, with `to` as the preferred successor, until it holds."""
    stream, _, consumer = name.partition(" > ")
    subject = (
        f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"
        if consumer
        else f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}"
    )
    request = json.dumps({"placement": {"preferred": to.name}}).encode()

    async def step_down() -> None:
        nc = await nats.connect([n.url for n in nodes])
        try:
            await nc.request(subject, request, timeout=5)
        finally:
            await nc.close()

    deadline = time.monotonic() + 60
    while leaders(to).get(name) != to.name:
        assert time.monotonic() < deadline, (name, to, leaders(to))
        asyncio.run(step_down())
        wait = time.monotonic() + 5
        while leaders(to).get(name) != to.name and time.monotonic() < wait:
            time.sleep(0.1)


def place_leaders(nodes: List[NatsNode], victim: NatsNode, led_by_victim: List[str]) -> None:
    """`victim` leads exactly `led_by_victim` of natserve's streams and consumer; another
    node leads the rest."""
    other = next(n for n in nodes if n is not victim)
    for name in [*STREAMS, " > ".join(CONSUMER)]:
        want = victim if name in led_by_victim else other
        if leaders(other).get(name) == want.name:
            continue
        if name not in led_by_victim and leaders(other).get(name) not in ("", victim.name):
            continue  # led by some node other than the victim: as good
        move_leader(nodes, name, want)


class ElectionWatch:
    """Notes, after `victim` died, when each stream and consumer it led has a new leader,
    as a surviving node sees it."""

    def __init__(self, survivor: NatsNode, victim: NatsNode) -> None:
        self.survivor = survivor
        self.led = [k for k, v in leaders(survivor).items() if v == victim.name]
        self.victim = victim
        self.elected: Dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self, killed_at: float) -> None:
        self.killed_at = killed_at
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set() and len(self.elected) < len(self.led):
            try:
                now = leaders(self.survivor)
            except (OSError, ValueError):
                now = {}
            at = time.monotonic() - self.killed_at
            for name in self.led:
                if name not in self.elected and now.get(name) not in ("", None, self.victim.name):
                    self.elected[name] = at
            self._stop.wait(ELECTION_POLL_S)

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(5)
        shown = [
            f"{k} {self.elected[k]:.1f} s" if k in self.elected else f"{k} none yet"
            for k in self.led
        ]
        return ", ".join(shown) or "nothing natserve uses"


def serving(
    cluster: Cluster,
    *,
    nodes: Optional[List[NatsNode]] = None,
    connect_to: Optional[List[NatsNode]] = None,
    timeout_ms: Optional[int] = NODE_KILL_TIMEOUT_MS,
) -> tuple[List[NatsNode], str, NatsNode]:
    """Three clustered nats-servers (or `nodes`), two agents and an ingress with
    `--replicas 3`, each given the URLs of `connect_to` (all nodes by default) and the
    ingress `--timeout timeout_ms` (natserve's default when None); the nodes, the
    ingress's URL and the node it is connected to."""
    nodes = nodes or cluster.nats_cluster(3)
    urls = ",".join(node.url for node in (connect_to or nodes))
    env = {"BEHAVE_WORKERS": "2"}
    for name in ("agent-1", "agent-2"):
        cluster.app(
            BEHAVE, "--role", "agent", "--nats", urls, "--replicas", "3", name=name, env=env
        )
    flags = ["--replicas", "3"]
    if timeout_ms is not None:
        flags += ["--timeout", str(timeout_ms)]
    base = cluster.ingress(BEHAVE, urls, *flags)
    # Both agents take work, and every stream natserve made is kept on all three nodes.
    warm = json.dumps({"action": "sleep", "seconds": 0.02}).encode()
    seen: set = set()
    deadline = time.monotonic() + 30
    while len(seen) < 2:
        assert time.monotonic() < deadline, seen
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda _: http("POST", base + "/inference", warm), range(16)))
        assert all(r.status == 200 for r in rs), rs
        seen |= {r.json()["agent"] for r in rs}  # type: ignore[index]
    for node in nodes:
        replicas = stream_replicas(node)
        assert all(replicas.get(s) == 3 for s in STREAMS), (node, replicas)
    home = [n for n in nodes if any(c.startswith("natserve-ingress") for c in n.client_names())]
    assert len(home) == 1, home
    return nodes, base, home[0]


@dataclass
class Run:
    outcomes: List[Outcome]
    refused: List[Outcome]
    lost: List[Outcome]
    killed_at: float


def liveness_lines(cluster: Cluster) -> List[str]:
    """What the ingress and the agents logged of the agents bucket and their heartbeats:
    when each lost and found it again, so a refusal can be placed against the outage."""
    marks = ("heartbeat", "agents bucket", "kv watch", "kv bucket")
    lines = []
    for log in sorted(cluster.tmp.glob("*.log")):
        if log.name.startswith(("ingress", "agent")):
            text = log.read_text(errors="replace").splitlines()
            lines += [f"{log.stem}: {line[:220]}" for line in text if any(m in line for m in marks)]
    return lines


def kill_under_load(
    cluster: Cluster, base: str, nodes: List[NatsNode], victim: NatsNode, label: str
) -> Run:
    """Steady load from `CLIENTS` clients, `victim` killed in the middle of it; prints the
    figures, asserts every request is answered 200 with its own answer or refused (503)
    only in the seconds after the kill, and that natserve serves after."""
    outcomes: List[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(1_000_000))

    def client() -> None:
        while not stop.is_set():
            with lock:
                tag = next(counter)
            body = json.dumps({"action": "sleep", "seconds": 0.005, "tag": tag}).encode()
            started = time.monotonic()
            try:
                r: Optional[Response] = http("POST", base + "/inference", body, timeout=30)
                error = ""
            except OSError as err:
                r, error = None, f"{type(err).__name__}: {err}"
            outcome = Outcome(tag, started, time.monotonic(), r, error)
            with lock:
                outcomes.append(outcome)
            if outcome.refused:
                time.sleep(BACKOFF_S)

    survivor = next(n for n in nodes if n is not victim)
    elections = ElectionWatch(survivor, victim)
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(BEFORE_KILL_S)
    killed_at = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGKILL)
    elections.start(killed_at)
    time.sleep(AFTER_KILL_S)
    stop.set()
    for t in threads:
        t.join(40)

    refused = [o for o in outcomes if o.refused]
    lost = [o for o in outcomes if not o.ok and not o.refused]
    after = sorted(o.ended for o in outcomes if o.ended > killed_at and o.ok)
    stall = max((b - a for a, b in zip([killed_at, *after], after)), default=AFTER_KILL_S)
    slowest = max(o.ended - o.started for o in outcomes if o.ok)
    last_refusal = max((o.ended - killed_at for o in refused), default=0.0)
    print(
        f"\nkill -9 of {label} ({victim.name}) under load ({CLIENTS} clients): "
        f"{len(outcomes)} requests, {len(outcomes) - len(refused) - len(lost)} 200 with their "
        f"own answer, {len(lost)} lost, {len(refused)} refused with 503 (the last "
        f"{last_refusal:.2f} s after the kill); longest pause in 200s after the kill "
        f"{stall:.2f} s; slowest 200 {slowest:.2f} s; new leaders after: {elections.stop()}"
    )
    reasons = Counter(o.response.body[:40] for o in refused if o.response is not None)
    print(f"refusals: {dict(reasons)}")
    shown = [(o.tag, round(o.ended - killed_at, 2), o.response or o.error) for o in lost[:10]]
    assert not lost, f"{len(lost)} of {len(outcomes)} lost: {shown}"
    assert last_refusal < REFUSED_WITHIN_S, [o.response for o in refused[-5:]]
    assert any(o.ok and o.started > killed_at + REFUSED_WITHIN_S for o in outcomes)
    # Still serving, on the two nodes left.
    rs = [http("POST", base + "/inference", b'{"tag": -1}', timeout=10) for _ in range(20)]
    assert all(r.status == 200 for r in rs), rs
    assert http("GET", base + "/", timeout=5).status == 200
    return Run(outcomes, refused, lost, killed_at)


#: What the dead node leads in the node-kill tests: everything natserve uses, the worst
#: case (every queue, bucket and the consumer elect at once).
EVERYTHING = [*STREAMS, " > ".join(CONSUMER)]


def test_a_nats_node_the_ingress_is_not_on_killed_under_load_loses_no_request(
    cluster: Cluster,
) -> None:
    nodes, base, home = serving(cluster)
    victim = next(n for n in nodes if n is not home)
    place_leaders(nodes, victim, EVERYTHING)
    kill_under_load(
        cluster, base, nodes, victim, "the leader of everything, not the ingress's node"
    )


def test_the_nats_node_the_ingress_is_on_killed_under_load_loses_no_request(
    cluster: Cluster,
) -> None:
    nodes, base, home = serving(cluster)
    place_leaders(nodes, home, EVERYTHING)
    kill_under_load(cluster, base, nodes, home, "the ingress's node, leader of everything")


def test_the_agents_bucket_losing_its_leader_counts_no_agent_as_gone(cluster: Cluster) -> None:
    # The node that dies leads the agents bucket and nothing else natserve uses, and no
    # natserve process is connected to it: what is left is the bucket's election.
    nodes = cluster.nats_cluster(3)
    victim = nodes[2]
    _, base, _ = serving(cluster, nodes=nodes, connect_to=nodes[:2], timeout_ms=None)
    place_leaders(nodes, victim, ["KV_natserve_agents"])
    run = kill_under_load(cluster, base, nodes, victim, "the agents bucket's leader")
    # The agents could not heartbeat while the bucket had no leader: that silence is no
    # death, and the ingress kept serving them, at natserve's default deadline.
    assert not run.refused, (
        Counter(o.response.body[:40] for o in run.refused if o.response),
        f"first refused {min(o.ended for o in run.refused) - run.killed_at:.2f} s after the kill",
        liveness_lines(cluster),
    )


def test_the_results_bucket_losing_its_leader_holds_back_no_reply(cluster: Cluster) -> None:
    # Durable replies are recorded in the results bucket; while it elects a leader the
    # records wait, the replies do not, at natserve's default deadline.
    nodes = cluster.nats_cluster(3)
    victim = nodes[2]
    _, base, _ = serving(cluster, nodes=nodes, connect_to=nodes[:2], timeout_ms=None)
    place_leaders(nodes, victim, ["KV_natserve_results"])
    run = kill_under_load(cluster, base, nodes, victim, "the results bucket's leader")
    assert not run.refused, Counter(o.response.body[:40] for o in run.refused if o.response)


def test_streams_made_with_one_copy_are_raised_to_the_replicas_asked(cluster: Cluster) -> None:
    # What an older deployment left: the work queue and the routes bucket on one server.
    nodes = cluster.nats_cluster(3)
    urls = ",".join(node.url for node in nodes)

    async def make() -> None:
        nc = await nats.connect(urls.split(","))
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=STREAMS[0],
                subjects=["natserve.work.inference.0"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.MEMORY,
                discard=DiscardPolicy.NEW,
                num_replicas=1,
            )
        )
        await js.create_key_value(KeyValueConfig(bucket="natserve_routes", history=1))
        await nc.close()

    asyncio.run(make())
    # One copy, on whichever node JetStream placed it.
    hosted = [stream_replicas(node).get(STREAMS[0]) for node in nodes]
    assert sorted(n for n in hosted if n is not None) == [1], hosted
    cluster.app(BEHAVE, "--role", "agent", "--nats", urls, "--replicas", "3", name="agent")
    base = cluster.ingress(BEHAVE, urls, "--replicas", "3")
    deadline = time.monotonic() + 30
    while (r := http("POST", base + "/inference", b'{"tag": 1}')).status != 200:
        assert time.monotonic() < deadline, r
        time.sleep(0.2)
    for node in nodes:
        replicas = stream_replicas(node)
        assert all(replicas.get(s) == 3 for s in STREAMS), (node, replicas)
