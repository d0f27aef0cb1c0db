"""The README's exp example, started as a user would: `python examples/exp.py` with no
--nats (so it runs its own nats-server), answered over HTTP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Tuple

import pytest

import natserve
from harness import EXAMPLES, REPO, Cluster, http, started_app

EXP = EXAMPLES / "exp.py"


@pytest.fixture(scope="module")
def exp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Cluster, str]]:
    tmp = tmp_path_factory.mktemp("exp")
    cluster, base, _ = started_app(tmp, EXP, "--max-body-size", "4096")
    try:
        yield cluster, base
    finally:
        cluster.stop_all()


def post(base: str, body: bytes, route: str = "/inference"):  # type: ignore[no-untyped-def]
    return http("POST", base + route, body)


def test_computes_exp(exp: Tuple[Cluster, str]) -> None:
    r = post(exp[1], b'{"x": 2}')
    assert r.status == 200, r
    assert r.json() == {"y": 7.38905609893065}
    assert r.headers["content-type"].startswith("application/json")
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_missing_key_is_422(exp: Tuple[Cluster, str]) -> None:
    r = post(exp[1], b'{"input": 2}')
    assert (r.status, r.text) == (422, "validation error: cannot find key 'x'")


def test_non_number_is_422(exp: Tuple[Cluster, str]) -> None:
    r = post(exp[1], b'{"x": "two"}')
    assert (r.status, r.text) == (422, "validation error: cannot convert 'x' value to float")


@pytest.mark.parametrize("body", [b"not json", b""])
def test_undecodable_body_is_400_with_one_line(exp: Tuple[Cluster, str], body: bytes) -> None:
    r = post(exp[1], body)
    assert r.status == 400, r
    assert r.text.startswith("decoding error: ")
    assert "\n" not in r.text.strip()


def test_unknown_route_is_404(exp: Tuple[Cluster, str]) -> None:
    r = post(exp[1], b'{"x": 2}', route="/nope")
    assert r.status == 404
    assert "/nope" in r.text


def test_wrong_method_is_405(exp: Tuple[Cluster, str]) -> None:
    assert http("GET", exp[1] + "/inference").status == 405


def test_body_over_the_limit_is_413(exp: Tuple[Cluster, str]) -> None:
    r = post(exp[1], b'{"x": "' + b"9" * 5000 + b'"}')
    assert r.status == 413, r


def test_readiness(exp: Tuple[Cluster, str]) -> None:
    assert http("GET", exp[1] + "/").status == 200


def test_metrics(exp: Tuple[Cluster, str]) -> None:
    for _ in range(3):
        post(exp[1], b'{"x": 1}')
    post(exp[1], b'{"input": 1}')
    text = http("GET", exp[1] + "/metrics").text
    ok = re.search(
        r'natserve_requests_total\{[^}]*route="/inference"[^}]*status="200"[^}]*\} (\d+)', text
    )
    assert ok and int(ok.group(1)) >= 3, text
    assert re.search(r'natserve_requests_total\{[^}]*status="422"[^}]*\} [1-9]', text)
    assert "natserve_request_duration_seconds_bucket{" in text
    assert re.search(r'natserve_stage_batch_size_count\{[^}]*stage="0"[^}]*\} [1-9]', text)
    assert re.search(r'natserve_queue_depth\{[^}]*stage="0"[^}]*\} 0', text)


def test_help_lists_every_flag_with_its_default() -> None:
    out = subprocess.run(
        [sys.executable, str(EXP), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for flag, default in [
        ("--port", "8000"),
        ("--address", "0.0.0.0"),
        ("--nats", None),
        ("--role", "all"),
        ("--stages", None),
        ("--timeout", "3000"),
        ("--max-body-size", "10485760"),
        ("--log-level", "info"),
        ("--namespace", "natserve"),
    ]:
        assert flag in out.stdout, flag
        if default:
            assert default in out.stdout, (flag, default)


def test_bad_flag_exits_with_one_line_naming_it(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(EXP), "--port", "eighty"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--port" in lines[0], out.stderr


def test_the_launcher_says_ready_when_get_root_answers_200(exp: Tuple[Cluster, str]) -> None:
    cluster, base = exp
    assert http("GET", base + "/").status == 200
    port = base.rsplit(":", 1)[1]
    line = f"natserve ready on http://127.0.0.1:{port} (routes: /inference)"
    deadline = time.monotonic() + 10
    while line not in cluster.procs[0].output():
        assert time.monotonic() < deadline, cluster.procs[0].output()[-2000:]
        time.sleep(0.05)
    assert cluster.procs[0].output().count("natserve ready on") == 1


def test_version_prints_and_exits_without_starting_anything() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "python-worker"))
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(EXP), "--version"], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"natserve {natserve.__version__}"
    assert "nats-server" not in out.stderr and time.monotonic() - started < 20
