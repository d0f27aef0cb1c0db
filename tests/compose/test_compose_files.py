"""The compose deployment's files, checked offline (no Docker needed).

Prometheus and Grafana images cannot be pulled here, so the `monitoring` profile is
validated by reading its files: they parse, point at each other, scrape what the compose
file exposes, and the dashboard only queries metrics the README documents. The compose
file itself is checked for what users rely on (scaling, healthchecks, grace periods, the
gpu profile), and with the compose CLI, when one is installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

from compose_images import DOCKERFILE, runtime_dockerfile

yaml = pytest.importorskip("yaml", reason="PyYAML is needed (make compose-test installs it)")

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> Dict[str, Any]:
    doc = load_yaml(REPO / "docker-compose.yml")
    assert isinstance(doc, dict)
    return doc


def services(compose: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def seconds(value: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def documented_metrics() -> Set[str]:
    return set(re.findall(r"natserve_[a-z_]+", readme_section("Metrics")))


def test_default_services_are_nats_ingress_and_a_scalable_worker(
    compose: Dict[str, Any],
) -> None:
    svc = services(compose)
    default = {name for name, s in svc.items() if not s.get("profiles")}
    assert default == {"nats", "ingress", "worker"}
    nats = svc["nats"]
    version = re.match(r"nats:(\d+)\.(\d+)", nats["image"])
    assert version and (int(version[1]), int(version[2])) >= (2, 11), nats["image"]
    config = nats_config(nats)
    store = re.search(r'^jetstream \{\s*store_dir: "([^"]+)"\s*\}', config, re.MULTILINE)
    assert store, "JetStream on, with a store directory"
    named = [v for v in nats["volumes"] if not v.startswith("./")]
    assert any(v.split(":")[1] == store[1] for v in named), "JetStream store on a volume"
    assert any(p.endswith(":8000") for p in svc["ingress"]["ports"])
    # Scaling needs no fixed names or host ports on workers.
    for name in ("worker", "worker-gpu"):
        assert "ports" not in svc[name] and "container_name" not in svc[name]
        assert svc[name]["environment"]["NATSERVE_ROLE"] == "agent"


def mounted(service: Dict[str, Any], target: str) -> Path:
    """The repository file a service mounts at ``target``."""
    for volume in service["volumes"]:
        source, path = volume.split(":")[:2]
        if path == target:
            assert source.startswith("./"), volume
            return REPO / source
    raise AssertionError(f"nothing is mounted at {target}")


def nats_config(nats: Dict[str, Any]) -> str:
    """The nats service's configuration file, with the files it includes inlined."""
    command = nats["command"]
    assert command[:1] == ["-c"], "nats-server runs from a configuration file"
    path = command[1]
    text = mounted(nats, path).read_text()

    def include(match: re.Match[str]) -> str:
        return mounted(nats, str(Path(path).parent / match[1])).read_text()

    return re.sub(r'^include "([^"]+)"$', include, text, flags=re.MULTILINE)


def test_nats_requires_authentication_and_every_natserve_service_has_credentials(
    compose: Dict[str, Any],
) -> None:
    svc = services(compose)
    nats = svc["nats"]
    config = nats_config(nats)
    # The compose file runs the README's least-privilege file as it is.
    assert mounted(nats, "/etc/nats/least-privilege.conf") == (
        REPO / "deploy" / "nats" / "least-privilege.conf"
    )
    assert "authorization {" in config and "no_auth_user" not in config
    users = dict(re.findall(r"\{user: (\w+), password: \$(\w+), permissions", config))
    assert set(users) == {"ingress", "agent", "client"}, users
    # Every password nats-server reads comes from the environment, with a documented
    # "change me" default (the README tells users to change them).
    for variable in users.values():
        default = re.fullmatch(r"\$\{(\w+):-(change-me-\w+)\}", nats["environment"][variable])
        assert default and default[1] == variable, nats["environment"][variable]
    section = readme_section("Docker Compose")
    assert "change" in section.lower() and all(v in section for v in users.values())
    # Each natserve service reaches NATS as its role's user, with that user's password.
    for name, user in (("ingress", "ingress"), ("worker", "agent"), ("worker-gpu", "agent")):
        url = svc[name]["environment"]["NATSERVE_NATS"]
        login = re.match(r"nats://(\w+):\$\{(\w+):-[\w-]+\}@", url)
        assert login, f"{name} has no NATS credentials: {url}"
        assert login[1] == user and login[2] == users[user], url
    # The healthcheck reads the monitoring port the configuration opens.
    assert "http_port: 8222" in config and "8222" in " ".join(nats["healthcheck"]["test"])


def test_healthchecks_mean_ready_and_need_nothing_outside_the_image(
    compose: Dict[str, Any],
) -> None:
    svc = services(compose)
    port = svc["worker"]["environment"]["NATSERVE_METRICS_ADDRESS"].rsplit(":", 1)[1]
    checks = {
        "ingress": "http://127.0.0.1:8000/",
        "worker": f"http://127.0.0.1:{port}/ready",
        "worker-gpu": f"http://127.0.0.1:{port}/ready",
    }
    for name, url in checks.items():
        test = svc[name]["healthcheck"]["test"]
        # The natserve image has python, not curl or wget.
        assert test[:3] == ["CMD", "python", "-c"], test
        assert url in test[3] and "urllib.request" in test[3], test
    assert "healthz" in " ".join(svc["nats"]["healthcheck"]["test"])
    for name in ("ingress", "worker"):
        assert svc[name]["depends_on"]["nats"]["condition"] == "service_healthy"


def test_stop_grace_periods_cover_the_drain(compose: Dict[str, Any]) -> None:
    from natserve import _launcher
    from natserve._settings import Settings

    svc = services(compose)
    # The launcher kills the agent only after its drain budget (default settings here);
    # the container must outlive that, or compose kills everything first.
    _, agent_kill_s = _launcher.kill_deadlines(Settings())
    for name in ("worker", "worker-gpu"):
        assert seconds(svc[name]["stop_grace_period"]) > agent_kill_s
    # The ingress finishes in-flight requests for up to NATSERVE_INGRESS_GRACE_MS (10 s).
    assert seconds(svc["ingress"]["stop_grace_period"]) > 10


def test_gpu_profile_reserves_nvidia_devices(compose: Dict[str, Any]) -> None:
    gpu = services(compose)["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "NUM_GPUS" in gpu["environment"]


def load_app() -> Any:
    spec = importlib.util.spec_from_file_location("natserve_compose_app", DOCKER / "app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_app_pins_one_inference_process_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_app()
    stages = app.build_server(3).routes["/inference"]
    assert [s.name for s in stages] == ["Preprocess", "Inference"]
    assert stages[1].num == 3
    assert stages[1].env == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(3)]
    assert stages[0].env is None
    cpu = app.build_server(0).routes["/inference"]
    assert cpu[1].num == 2 and cpu[1].env is None
    monkeypatch.setenv("NUM_GPUS", "4")
    assert app.gpu_count() == 4
    monkeypatch.setenv("NUM_GPUS", "four")
    with pytest.raises(SystemExit, match="NUM_GPUS"):
        app.gpu_count()


def test_monitoring_profile_files_fit_together(compose: Dict[str, Any]) -> None:
    svc = services(compose)
    assert svc["prometheus"]["profiles"] == svc["grafana"]["profiles"] == ["monitoring"]
    # Every file the monitoring services mount exists in the repository.
    mounts: Dict[str, str] = {}
    for name in ("prometheus", "grafana"):
        for volume in svc[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO / source).exists(), source
                mounts[target] = source

    prometheus = load_yaml(REPO / mounts["/etc/prometheus/prometheus.yml"])
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    ingress_targets = [t for c in jobs["natserve-ingress"]["static_configs"] for t in c["targets"]]
    assert ingress_targets == ["ingress:8000"]
    (dns,) = jobs["natserve-agent"]["dns_sd_configs"]
    metrics_port = svc["worker"]["environment"]["NATSERVE_METRICS_ADDRESS"].rsplit(":", 1)[1]
    assert set(dns["names"]) == {"worker", "worker-gpu"} and str(dns["port"]) == metrics_port

    provisioning = REPO / mounts["/etc/grafana/provisioning"]
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "natserve.yml")["providers"]
    dashboards = REPO / mounts[provider["options"]["path"]]
    (dashboard_file,) = dashboards.glob("*.json")
    dashboard = json.loads(dashboard_file.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
    home = svc["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{dashboard_file.name}"


def dashboard_exprs() -> List[str]:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "natserve.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_dashboard_queries_only_documented_metrics() -> None:
    documented = documented_metrics()
    used = {m for e in dashboard_exprs() for m in re.findall(r"natserve_[a-z_]+", e)}
    for metric in used:
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        assert metric in documented or base in documented, f"{metric} is not in the README"
    # Throughput, latency percentiles, batch sizes, queue depth and workers per stage.
    for wanted in (
        "natserve_requests_total",
        "natserve_request_duration_seconds_bucket",
        "natserve_stage_batch_size_bucket",
        "natserve_queue_depth",
        "natserve_stage_workers",
        "natserve_agent_items_total",
    ):
        assert wanted in used, wanted
    assert any("histogram_quantile(0.99" in e for e in dashboard_exprs())


def test_dockerfile_is_multi_stage_and_the_test_builds_its_runtime_stage_verbatim() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.MULTILINE)
    assert froms == [("${RUST_IMAGE}", "build"), ("${PYTHON_IMAGE}", "runtime")]
    runtime = text[text.index("FROM ${PYTHON_IMAGE} AS runtime") :]
    assert re.search(r"^USER natserve", runtime, re.MULTILINE), "runs as a non-root user"
    derived = runtime_dockerfile("wheels:test")
    assert derived.endswith(runtime if runtime.endswith("\n") else runtime + "\n")
    assert "FROM wheels:test AS build" in derived


def test_compose_variables_are_documented(compose: Dict[str, Any]) -> None:
    text = (REPO / "docker-compose.yml").read_text()
    variables = set(re.findall(r"\$\{(\w+)", text))
    section = readme_section("Docker Compose")
    missing = sorted(v for v in variables if v not in section)
    assert not missing, f"not in the README's Docker Compose section: {missing}"


@pytest.mark.parametrize("cli", [["docker-compose"], ["docker", "compose"]])
def test_compose_cli_accepts_the_file_with_every_profile(cli: List[str]) -> None:
    if shutil.which(cli[0]) is None or (
        len(cli) > 1 and subprocess.run([*cli, "version"], capture_output=True).returncode
    ):
        pytest.skip(f"{' '.join(cli)} is not installed")
    files = ["-f", str(REPO / "docker-compose.yml")]
    for profiles in ([], ["--profile", "gpu"], ["--profile", "monitoring"]):
        proc = subprocess.run(
            [*cli, *files, *profiles, "config", "-q"], capture_output=True, text=True, cwd=REPO
        )
        assert proc.returncode == 0, proc.stderr


def test_nats_carries_the_body_size_the_readme_documents(compose: Dict[str, Any]) -> None:
    # nats-server's own max_payload is 1 MiB: without this, bodies above ~1 MiB would be
    # 413 in the compose stack although --max-body-size allows 10 MiB.
    config = nats_config(services(compose)["nats"])
    limit = re.search(r"^max_payload: (\d+)$", config, flags=re.MULTILINE)
    assert limit, "docker-compose.yml's nats keeps the 1 MiB default max_payload"
    flags = readme_section("Flags")
    documented = re.search(r"`--max-body-size`[^|]*\| `NATSERVE_MAX_BODY_SIZE` \| (\d+)", flags)
    assert documented
    header_reserve = 4 * 1024  # ingress/src/submit.rs HEADER_RESERVE
    assert int(limit[1]) >= int(documented[1]) + header_reserve


def test_cluster_file_runs_three_clustered_nats_nodes_and_points_natserve_at_all(
    compose: Dict[str, Any],
) -> None:
    cluster = load_yaml(REPO / "docker-compose.cluster.yml")
    svc = cluster["services"]
    nodes = ["nats", "nats-2", "nats-3"]
    assert [n for n in svc if n.startswith("nats")] == nodes
    names, volumes = set(), set()
    for node in nodes:
        merged = {**services(compose).get(node, {}), **svc[node]}
        config = nats_config(merged)
        # The single node's configuration (users, JetStream, max_payload) plus the routes.
        assert 'include "compose.conf"' in (REPO / "deploy/nats/cluster.conf").read_text()
        assert "cluster {" in config and 'include "least-privilege.conf"' in config
        routes = re.findall(r'"nats-route://([\w-]+):6222"', config)
        assert sorted(routes) == nodes, routes
        names.add(merged["environment"]["NATSERVE_NATS_SERVER_NAME"])
        volumes |= {v.split(":")[0] for v in merged["volumes"] if not v.startswith("./")}
    assert len(names) == 3 and len(volumes) == 3, (names, volumes)
    assert set(cluster["volumes"]) | {"nats-data"} == volumes
    for name, user in (("ingress", "ingress"), ("worker", "agent"), ("worker-gpu", "agent")):
        env = svc[name]["environment"]
        urls = env["NATSERVE_NATS"].split(",")
        hosts = [re.fullmatch(rf"nats://{user}:\$\{{\w+:-[\w-]+\}}@([\w-]+):4222", u) for u in urls]
        assert [h[1] if h else u for h, u in zip(hosts, urls)] == nodes, urls
        assert env["NATSERVE_REPLICAS"] == "3"
        assert set(svc[name]["depends_on"]) == {"nats-2", "nats-3"}


def test_agents_keep_their_queues_on_the_nats_volume(compose: Dict[str, Any]) -> None:
    for name in ("worker", "worker-gpu"):
        assert services(compose)[name]["environment"]["NATSERVE_STORAGE"] == "file"


@pytest.mark.parametrize("cli", [["docker-compose"], ["docker", "compose"]])
def test_compose_cli_accepts_the_cluster_file_on_top(cli: List[str]) -> None:
    if shutil.which(cli[0]) is None or (
        len(cli) > 1 and subprocess.run([*cli, "version"], capture_output=True).returncode
    ):
        pytest.skip(f"{' '.join(cli)} is not installed")
    files = ["-f", str(REPO / "docker-compose.yml"), "-f", str(REPO / "docker-compose.cluster.yml")]
    proc = subprocess.run([*cli, *files, "config"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    merged = yaml.safe_load(proc.stdout)["services"]
    assert {"nats", "nats-2", "nats-3"} <= set(merged)
    assert merged["ingress"]["environment"]["NATSERVE_NATS"].count("@nats") == 3
