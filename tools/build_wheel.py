"""Builds the installable natserve wheel: ``make wheel``.

The two Rust binaries are cross-built for glibc 2.17 with cargo-zigbuild (zig as the C
compiler and linker, both from PyPI: ``ziglang``, ``cargo-zigbuild``), so the wheel runs
on any x86_64 Linux from CentOS 7 on, as PyPI's ``manylinux_2_17`` tag promises. The
wheel is ``py3-none-manylinux_2_17_x86_64``: the Python code runs on every CPython >= 3.9
and the binaries need only libc. ``auditwheel show`` then checks that the tag is honest
(no symbol newer than glibc 2.17, no library outside the manylinux set).

    python tools/build_wheel.py [--out dist]

Prints the wheel's path and size. Needs cargo; the wheel it writes does not.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = "x86_64-unknown-linux-gnu"
GLIBC = "2.17"
PLATFORM = "manylinux_2_17_x86_64"
BINARIES = ("natserve-ingress", "natserve-agent")
#: What the build needs in this interpreter's environment: (how to tell it is there, package).
TOOLS = (
    ("script:cargo-zigbuild", "cargo-zigbuild"),
    ("module:ziglang", "ziglang"),
    ("module:auditwheel", "auditwheel"),
    ("setuptools:77", "setuptools>=77"),
)


def scripts_dir() -> Path:
    return Path(sys.executable).parent


def _present(probe: str) -> bool:
    kind, _, name = probe.partition(":")
    if kind == "script":
        return (scripts_dir() / name).exists()
    if kind == "setuptools":  # the wheel is built without isolation, by this one
        try:
            return int(importlib.metadata.version("setuptools").split(".")[0]) >= int(
                name
            )
        except importlib.metadata.PackageNotFoundError:
            return False
    return importlib.util.find_spec(name) is not None


def ensure_tools() -> None:
    """Installs the build tools into this interpreter's environment when missing."""
    missing = [package for probe, package in TOOLS if not _present(probe)]
    if missing:
        print(
            f"natserve: installing the wheel build tools ({', '.join(missing)})",
            flush=True,
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True
        )


def build_binaries() -> Path:
    env = dict(os.environ)
    # cargo-zigbuild finds zig through `python -m ziglang` of the interpreter on PATH.
    env["PATH"] = f"{scripts_dir()}{os.pathsep}{env.get('PATH', '')}"
    command = [
        "cargo", "zigbuild", "--release", "--locked", "--target", f"{TARGET}.{GLIBC}",
        "-p", "natserve-ingress", "-p", "natserve-agent",
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, env=env, check=True)
    target_dir = Path(env.get("CARGO_TARGET_DIR") or REPO / "target")
    return (REPO / target_dir) / TARGET / "release"


def build_wheel(binaries: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, NATSERVE_PREBUILT_BIN=str(binaries), NATSERVE_WHEEL_PLAT=PLATFORM
    )
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                "--no-build-isolation", "--wheel-dir", tmp, str(REPO / "python-worker"),
            ],
            env=env, check=True,
        )  # fmt: skip
        (built,) = Path(tmp).glob("natserve-*.whl")
        for old in out.glob(f"natserve-*-{PLATFORM}.whl"):
            old.unlink()
        target = out / built.name
        shutil.move(str(built), target)
    return target


def check_tag(wheel: Path) -> None:
    shown = subprocess.run(
        [str(scripts_dir() / "auditwheel"), "show", str(wheel)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if not re.search(rf'"{PLATFORM}"', shown):
        raise SystemExit(
            f"auditwheel does not find {wheel.name} consistent with {PLATFORM}:\n{shown}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    args = parser.parse_args()
    if shutil.which("cargo") is None:
        print("make wheel needs cargo (the wheel it writes does not)", file=sys.stderr)
        return 2
    ensure_tools()
    wheel = build_wheel(build_binaries(), args.out)
    check_tag(wheel)
    size = wheel.stat().st_size / 1e6
    print(f"natserve: wrote {wheel.relative_to(REPO)} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
