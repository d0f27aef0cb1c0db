"""Launcher flags: defaults, NATSERVE_* env, precedence, one-line errors with status 64."""

from __future__ import annotations

from typing import Dict, List

import pytest

from natserve._settings import Settings, parse_settings


def test_defaults() -> None:
    settings, rest = parse_settings([], env={})
    assert settings == Settings()
    assert (settings.port, settings.address, settings.nats, settings.role) == (
        8000,
        "0.0.0.0",
        None,
        "all",
    )
    assert (settings.stages, settings.timeout, settings.max_body_size) == (None, 3000, 10485760)
    assert (settings.log_level, settings.namespace) == ("info", "natserve")
    assert rest == []


def test_flags() -> None:
    argv = [
        "--port", "9000", "--address", "127.0.0.1", "--nats", "nats://h:4222",
        "--role", "agent", "--stages", "Preprocess, /inference:1", "--timeout", "500",
        "--max-body-size", "1024", "--log-level", "DEBUG", "--namespace", "prod-1",
    ]  # fmt: skip
    settings, rest = parse_settings(argv, env={})
    assert settings == Settings(
        port=9000,
        address="127.0.0.1",
        nats="nats://h:4222",
        role="agent",
        stages=("Preprocess", "/inference:1"),
        timeout=500,
        max_body_size=1024,
        log_level="debug",
        namespace="prod-1",
    )
    assert rest == []
    assert settings.runs_agent and not settings.runs_ingress


def test_env_overrides_defaults_and_flags_beat_env() -> None:
    env = {
        "NATSERVE_PORT": "7000",
        "NATSERVE_ROLE": "ingress",
        "NATSERVE_MAX_BODY_SIZE": "10",
        "NATSERVE_NATS": "nats://env:4222",
        "NATSERVE_NAMESPACE": "",  # empty counts as unset
    }
    settings, _ = parse_settings(["--port", "7001"], env=env)
    assert settings.port == 7001
    assert settings.role == "ingress"
    assert settings.max_body_size == 10
    assert settings.nats == "nats://env:4222"
    assert settings.namespace == "natserve"


def test_unknown_arguments_are_left_for_the_user() -> None:
    settings, rest = parse_settings(["--model", "big", "--port", "1234", "-v", "file.txt"], env={})
    assert settings.port == 1234
    assert rest == ["--model", "big", "-v", "file.txt"]


def test_prefixes_of_natserve_flags_are_not_taken_as_flags() -> None:
    settings, rest = parse_settings(["--po", "1"], env={})
    assert settings.port == 8000 and rest == ["--po", "1"]


@pytest.mark.parametrize(
    ("argv", "env", "line"),
    [
        (["--port", "abc"], {}, "natserve: error: --port: invalid int value 'abc'"),
        (
            [],
            {"NATSERVE_PORT": "abc"},
            "natserve: error: --port: invalid int value 'abc' (from NATSERVE_PORT)",
        ),
        (
            ["--port", "70000"],
            {},
            "natserve: error: --port: invalid value '70000': must be >= 0 and <= 65535",
        ),
        (["--timeout", "0"], {}, "natserve: error: --timeout: invalid value '0': must be >= 1"),
        (["--timeout", "-3"], {}, "natserve: error: --timeout: invalid int value '-3'"),
        (
            ["--role", "boss"],
            {},
            "natserve: error: --role: invalid choice 'boss' (choose from all, agent, ingress)",
        ),
        (
            [],
            {"NATSERVE_LOG_LEVEL": "loud"},
            "natserve: error: --log-level: invalid choice 'loud' "
            "(choose from debug, info, warning, error) (from NATSERVE_LOG_LEVEL)",
        ),
        (
            ["--namespace", "a.b"],
            {},
            "natserve: error: --namespace: invalid namespace 'a.b': must match ^[A-Za-z0-9_-]+$",
        ),
        (
            ["--max-body-size", "1e6"],
            {},
            "natserve: error: --max-body-size: invalid int value '1e6'",
        ),
        (
            ["--stages", ","],
            {},
            "natserve: error: --stages: invalid value ',': "
            "expected a comma-separated list of stages",
        ),
        (["--port"], {}, "natserve: error: --port: expected one argument"),
        (["--max-queue", "0"], {}, "natserve: error: --max-queue: invalid value '0': must be >= 1"),
        (
            ["--storage", "disk"],
            {},
            "natserve: error: --storage: invalid choice 'disk' (choose from memory, file)",
        ),
        (
            ["--nats", "nats://a:4222", "--replicas", "6"],
            {},
            "natserve: error: --replicas: invalid value '6': must be >= 1 and <= 5",
        ),
        (
            ["--replicas", "3"],
            {},
            "natserve: error: --replicas: more than one copy needs a JetStream cluster: give "
            "its servers with --nats (the nats-server started without --nats is a single "
            "server)",
        ),
        (
            [],
            {"NATSERVE_PREFETCH": "maybe"},
            "natserve: error: --prefetch: invalid value 'maybe' (choose from auto, on, off) "
            "(from NATSERVE_PREFETCH)",
        ),
        (
            ["--metrics-address", "localhost:9100"],
            {},
            "natserve: error: --metrics-address: invalid address 'localhost:9100': "
            "expected IP:PORT, like 0.0.0.0:9100 or [::]:9100",
        ),
        (
            ["--metrics-address", "0.0.0.0:99999"],
            {},
            "natserve: error: --metrics-address: invalid address '0.0.0.0:99999': "
            "expected IP:PORT, like 0.0.0.0:9100 or [::]:9100",
        ),
        (
            ["--metrics-address", "::1:9100"],
            {},
            "natserve: error: --metrics-address: invalid address '::1:9100': "
            "expected IP:PORT, like 0.0.0.0:9100 or [::]:9100",
        ),
        (
            ["--heartbeat-ms", "99"],
            {},
            "natserve: error: --heartbeat-ms: invalid value '99': must be >= 100",
        ),
        (
            ["--agent-grace-ms", "-1"],
            {},
            "natserve: error: --agent-grace-ms: invalid int value '-1'",
        ),
        (
            [],
            {"NATSERVE_INGRESS_GRACE_MS": "10s"},
            "natserve: error: --ingress-grace-ms: invalid int value '10s' "
            "(from NATSERVE_INGRESS_GRACE_MS)",
        ),
        (
            ["--result-ttl-s", "0"],
            {},
            "natserve: error: --result-ttl-s: invalid value '0': must be >= 1 and <= 604800",
        ),
        (
            ["--result-ttl-s", "10"],
            {"NATSERVE_ASYNC_TIMEOUT_MS": "10001"},
            "natserve: error: --async-timeout-ms: must not exceed --result-ttl-s (10 s): "
            "a job's pending record must outlive its deadline",
        ),
        (
            ["--socket-dir", __file__],
            {},
            f"natserve: error: --socket-dir: invalid directory {__file__!r}: "
            "it exists and is not a directory",
        ),
    ],
)
def test_bad_values_exit_64_with_one_line_naming_the_flag(
    argv: List[str], env: Dict[str, str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(argv, env=env)
    assert info.value.code == 64  # EX_USAGE, as the Rust binaries exit on a bad value
    captured = capsys.readouterr()
    assert captured.err == line + "\n"
    assert captured.out == ""


def test_help_lists_every_flag_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(["--help"], env={})
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [
        ("--port", "8000"),
        ("--address", "0.0.0.0"),
        ("--nats", "none"),
        ("--role", "all"),
        ("--stages", "none"),
        ("--timeout", "3000"),
        ("--max-body-size", "10485760"),
        ("--log-level", "info"),
        ("--namespace", "natserve"),
        ("--max-queue", "10000"),
        ("--storage", "memory"),
        ("--replicas", "1"),
        ("--result-ttl-s", "3600"),
        ("--async-timeout-ms", "600000"),
        ("--prefetch", "auto"),
        ("--metrics-address", "none"),
        ("--heartbeat-ms", "2000"),
        ("--agent-grace-ms", "30000"),
        ("--ingress-grace-ms", "10000"),
        ("--socket-dir", "none"),
    ]:
        assert flag in text
        env = "NATSERVE_" + flag[2:].replace("-", "_").upper()
        assert f"(default: {default}; env {env})" in text, flag


def test_agent_and_ingress_settings_from_flags_and_env() -> None:
    argv = [
        "--max-queue", "50", "--storage", "FILE", "--prefetch", "yes",
        "--metrics-address", "[::]:9100", "--heartbeat-ms", "100",
        "--agent-grace-ms", "0", "--socket-dir", "/tmp/natserve-sockets",
    ]  # fmt: skip
    env = {"NATSERVE_INGRESS_GRACE_MS": "2500", "NATSERVE_MAX_QUEUE": "7"}
    settings, rest = parse_settings(argv, env=env)
    assert rest == []
    assert (settings.max_queue, settings.storage, settings.prefetch) == (50, "file", "on")
    assert (settings.metrics_address, settings.heartbeat_ms) == ("[::]:9100", 100)
    assert (settings.agent_grace_ms, settings.ingress_grace_ms) == (0, 2500)
    assert settings.socket_dir == "/tmp/natserve-sockets"
    cluster = {"NATSERVE_NATS": "nats://a:4222,nats://b:4222", "NATSERVE_REPLICAS": "3"}
    assert parse_settings([], env=cluster)[0].replicas == 3
    assert parse_settings([], env={"NATSERVE_PREFETCH": "0"})[0].prefetch == "off"
    assert parse_settings([], env={"NATSERVE_PREFETCH": "1"})[0].prefetch == "on"
    assert parse_settings([], env={"NATSERVE_PREFETCH": "Auto"})[0].prefetch == "auto"
    assert parse_settings([])[0].prefetch == "auto"


def test_async_job_settings_reach_the_ingress_together() -> None:
    settings, _ = parse_settings(
        ["--result-ttl-s", "60"], env={"NATSERVE_ASYNC_TIMEOUT_MS": "60000"}
    )
    assert (settings.result_ttl_s, settings.async_timeout_ms) == (60, 60000)
