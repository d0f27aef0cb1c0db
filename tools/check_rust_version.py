"""Checks that the workspace's `rust-version` is no older than what its dependencies need.

No second toolchain can be installed to build with the declared minimum, so this reads what
each crate in the resolved graph (for this host's platform) declares and fails when one
needs a newer Rust than the workspace claims. Run from the repository root.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path


def version(text: str) -> tuple[int, ...]:
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main() -> int:
    declared = tomllib.loads(Path("Cargo.toml").read_text())["workspace"]["package"][
        "rust-version"
    ]
    host = next(
        line.split(": ", 1)[1]
        for line in subprocess.check_output(["rustc", "-vV"], text=True).splitlines()
        if line.startswith("host: ")
    )
    meta = json.loads(
        subprocess.check_output(
            [
                "cargo",
                "metadata",
                "--format-version",
                "1",
                "--locked",
                "--filter-platform",
                host,
            ],
            text=True,
        )
    )
    used = {node["id"] for node in meta["resolve"]["nodes"]}
    needs = sorted(
        (version(p["rust_version"]), p["name"], p["version"])
        for p in meta["packages"]
        if p["id"] in used and p.get("rust_version")
    )
    newest, name, at = needs[-1]
    if newest > version(declared):
        print(
            f"rust-version {declared} in Cargo.toml is too old: {name} {at} needs "
            f"{'.'.join(map(str, newest))}; raise it",
            file=sys.stderr,
        )
        return 1
    print(
        f"rust-version {declared} covers every dependency (newest need: {name} {at}, "
        f"{'.'.join(map(str, newest))})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
