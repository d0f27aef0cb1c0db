"""deploy/kubernetes against a running natserve: the manifests parse as Kubernetes
objects, and every stream and consumer KEDA is told to watch is one that natserve really
creates for the image's app (docker/app.py), run here with a real nats-server. No
Kubernetes cluster runs here; what a cluster would check beyond this is not checked."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import nats
import pytest

from harness import REPO, Cluster, free_port, wait_ready

yaml = pytest.importorskip("yaml", reason="PyYAML is needed (make install installs it)")

MANIFESTS = REPO / "deploy" / "kubernetes"
APP = REPO / "docker" / "app.py"


def objects() -> List[Dict[str, Any]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    docs: List[Dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]
    return docs


def test_every_manifest_is_a_kubernetes_object_and_the_kustomization_lists_them() -> None:
    listed = set(yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for doc in objects():
        api = doc.get("apiVersion")
        assert isinstance(api, str) and (api == "v1" or "/" in api), doc
        assert isinstance(doc.get("kind"), str) and doc["metadata"]["name"], doc
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]
            assert doc["spec"]["template"]["spec"]["containers"], doc["metadata"]["name"]


def keda_targets() -> List[Tuple[str, str, str]]:
    """(stream, consumer, stage the scaled Deployment hosts) of every ScaledObject."""
    deployments = {d["metadata"]["name"]: d for d in objects() if d["kind"] == "Deployment"}
    out = []
    for scaled in (d for d in objects() if d["kind"] == "ScaledObject"):
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "nats-jetstream"
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        (container,) = target["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert args[args.index("--role") + 1] == "agent"
        stage = args[args.index("--stages") + 1]
        meta = trigger["metadata"]
        out.append((meta["stream"], meta["consumer"], stage))
    assert out, "no ScaledObject"
    return out


async def streams_and_consumers(url: str) -> Dict[str, Set[str]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        found: Dict[str, Set[str]] = {}
        for info in await js.streams_info():
            name = info.config.name
            assert name is not None
            found[name] = {c.name for c in await js.consumers_info(name) if c.name}
        return found
    finally:
        await nc.close()


def test_keda_watches_the_streams_and_consumers_natserve_creates(
    cluster: Cluster, tmp_path: Path
) -> None:
    url = cluster.nats()
    port = free_port()
    env = {"NUM_GPUS": "0", "PYTHONPATH": str(REPO / "python-worker")}
    proc = cluster.app(APP, "--nats", url, "--port", str(port), "--address", "127.0.0.1", env=env)
    wait_ready(f"http://127.0.0.1:{port}", proc)
    found = asyncio.run(streams_and_consumers(url))
    # The image's pipeline: stage i of /inference is the i-th appended worker class.
    stage_index = {"Preprocess": 0, "Inference": 1}
    for stream, consumer, stage in keda_targets():
        assert stream in found, (stream, sorted(found))
        assert consumer in found[stream], (stream, consumer, found[stream])
        assert stream == f"natserve_work_inference_{stage_index[stage]}", (stream, stage)
