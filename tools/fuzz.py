"""Runs the cargo fuzz targets in `fuzz/` for a bounded time each and reports the result.

    python tools/fuzz.py --seconds 10        # make test: a short, bounded run
    python tools/fuzz.py --seconds 300       # make fuzz: longer

Each target starts from its committed seeds (`fuzz/seeds/<target>`) plus what earlier runs
on this machine found (a corpus kept under the cache directory, never in the tree). A
crash leaves its input in `fuzz/artifacts/<target>/` and fails the run. Builds go to a
target directory in the cache, so a second run (or CI on the same machine) does not
rebuild the instrumented dependencies. The last line is `N passed, N failed`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("frame", "http_request")
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "natserve" / "fuzz"
)
# Stable Rust suffices without a sanitizer; the targets check their own invariants.
BUILD_FLAGS = ["-O", "--sanitizer", "none"]


def ensure_cargo_fuzz() -> None:
    probe = subprocess.run(
        ["cargo", "fuzz", "--version"], check=False, capture_output=True, text=True
    )
    if probe.returncode != 0:
        print(
            "installing cargo-fuzz (crates.io; about 2 minutes the first time)",
            flush=True,
        )
        subprocess.run(["cargo", "install", "--locked", "cargo-fuzz"], check=True)


def run_target(target: str, seconds: int, target_dir: Path) -> tuple[bool, str]:
    corpus = CACHE / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = REPO / "fuzz" / "seeds" / target
    command = [
        "cargo", "fuzz", "run", *BUILD_FLAGS, "--target-dir", str(target_dir),
        target, str(corpus), str(seeds), "--",
        f"-max_total_time={seconds}", "-print_final_stats=1", "-timeout=10",
    ]  # fmt: skip
    done = subprocess.run(
        command, check=False, cwd=REPO, capture_output=True, text=True
    )
    output = done.stdout + done.stderr
    runs = re.search(r"Done (\d+) runs in (\d+) second", output)
    if done.returncode == 0 and runs:
        return (
            True,
            f"{target}: {runs.group(1)} executions in {runs.group(2)} s, no crash",
        )
    artifacts = sorted((REPO / "fuzz" / "artifacts" / target).glob("*"))
    tail = "\n".join(output.strip().splitlines()[-25:])
    found = f"; inputs in {', '.join(map(str, artifacts))}" if artifacts else ""
    return False, f"{target}: FAILED (exit {done.returncode}){found}\n{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=int, default=10, help="per target (default 10)"
    )
    parser.add_argument("targets", nargs="*", default=list(TARGETS))
    args = parser.parse_args()
    if shutil.which("cargo") is None:
        print("cargo not found", file=sys.stderr)
        return 1
    ensure_cargo_fuzz()
    target_dir = CACHE / "target"
    print(
        f"building fuzz targets (cached in {target_dir}; minutes the first time)",
        flush=True,
    )
    subprocess.run(
        ["cargo", "fuzz", "build", *BUILD_FLAGS, "--target-dir", str(target_dir)],
        cwd=REPO,
        check=True,
    )
    passed = failed = 0
    for target in args.targets:
        ok, line = run_target(target, args.seconds, target_dir)
        print(line, flush=True)
        passed, failed = passed + ok, failed + (not ok)
    print(f"fuzz: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
