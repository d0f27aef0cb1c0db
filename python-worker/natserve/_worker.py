"""The worker process: what an agent runs for each worker of a stage it hosts.

The agent runs ``worker_cmd`` (``python -m natserve._worker_main SCRIPT ARGS...``) with
``NATSERVE_WORKER_SPEC`` (the stage's entry of the agent config, JSON),
``NATSERVE_WORKER_STAGES``, ``NATSERVE_WORKER_ID``, ``NATSERVE_SOCKET`` and
``NATSERVE_LOG_FORMAT`` set. This
process imports the user's script the way multiprocessing's spawn does (as
``__mp_main__``, so its ``if __name__ == "__main__":`` block does not run), finds the
stage's `Worker` class from the spec's ``module:qualname``, and takes every parameter
from the spec, never from re-running ``append_worker``. It then connects to the socket,
builds the worker (``worker_id``, ``stage`` and ``max_batch_size`` set before
``__init__``), warms it up, sends READY with its pid (saying it reads batches with
request and trace ids, which its log records then carry) and answers every BATCH with one
RESULTS frame of the same id (see `natserve._batch` for how items fail independently),
preceded by any STREAM frames its ``forward`` sent. The main thread reads the agent's
frames between batches; while one runs, ``is_cancelled`` looks for a CANCEL itself
(`natserve._running`).
It exits 0 when the agent closes the socket, and 1 when the worker cannot start or the
agent breaks the protocol; the agent restarts it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Type

from ._batch import BatchRunner
from ._logging import configure
from ._protocol import (
    DEFAULT_MAX_FRAME,
    Batch,
    Cancel,
    Connection,
    FrameError,
    Ready,
    Results,
)
from ._running import Running
from ._settings import parse_settings
from ._worker_base import Worker

logger = logging.getLogger("natserve.worker")

#: The module name multiprocessing's spawn gives a re-imported main script: anything but
#: ``"__main__"``, so the script's main block stays out of worker processes.
SCRIPT_MODULE = "__mp_main__"

# True only while this process imports the user's script; `Server.run()` then returns at
# once, so a script without a main guard does not launch a second service from a worker.
_importing_script = False


def importing_script() -> bool:
    """Whether the user's script is being imported by a worker process right now."""
    return _importing_script


class WorkerSpecError(ValueError):
    """The agent's description of this worker is missing, malformed or names no class."""


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process's stage, as the agent described it (docs/protocol.md)."""

    route: str
    stage: int
    name: str
    worker: str  # module:qualname
    max_batch_size: int
    mime: str
    stages: int  # in the route
    worker_id: int  # 1-based within the stage on this agent

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def label(self) -> str:
        return f"[{self.route}:{self.stage} #{self.worker_id}]"


def _field(spec: Mapping[str, Any], key: str) -> Any:
    if key not in spec:
        raise WorkerSpecError(f"NATSERVE_WORKER_SPEC has no {key!r}")
    return spec[key]


def _str_field(spec: Mapping[str, Any], key: str) -> str:
    value = _field(spec, key)
    if not isinstance(value, str):
        raise WorkerSpecError(f"NATSERVE_WORKER_SPEC: {key} must be a string, got {value!r}")
    return value


def _int_field(spec: Mapping[str, Any], key: str, minimum: int) -> int:
    value = _field(spec, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise WorkerSpecError(
            f"NATSERVE_WORKER_SPEC: {key} must be an integer >= {minimum}, got {value!r}"
        )
    return value


def _env_count(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env.get(name)
    if raw is None:
        raise WorkerSpecError(f"{name} is not set; this process must be started by an agent")
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise WorkerSpecError(f"{name} must be an integer >= {minimum}, got {raw!r}")
    return value


def spec_from_env(env: Mapping[str, str]) -> WorkerSpec:
    """The spec the agent put in ``env``; raises `WorkerSpecError` saying what is wrong."""
    raw = env.get("NATSERVE_WORKER_SPEC")
    if not raw:
        raise WorkerSpecError(
            "NATSERVE_WORKER_SPEC is not set; this process must be started by an agent"
        )
    try:
        spec = json.loads(raw)
    except ValueError as err:
        raise WorkerSpecError(f"NATSERVE_WORKER_SPEC is not JSON ({err}): {raw[:200]!r}") from err
    if not isinstance(spec, dict):
        raise WorkerSpecError(f"NATSERVE_WORKER_SPEC must be a JSON object, got {raw[:200]!r}")
    worker = _str_field(spec, "worker")
    if worker.count(":") != 1 or not all(worker.split(":")):
        raise WorkerSpecError(
            f"NATSERVE_WORKER_SPEC: worker must be 'module:qualname', got {worker!r}"
        )
    stage = _int_field(spec, "stage", 0)
    stages = _env_count(env, "NATSERVE_WORKER_STAGES", 1)
    if stage >= stages:
        raise WorkerSpecError(
            f"NATSERVE_WORKER_SPEC: stage {stage} is not below NATSERVE_WORKER_STAGES={stages}"
        )
    return WorkerSpec(
        route=_str_field(spec, "route"),
        stage=stage,
        name=_str_field(spec, "name"),
        worker=worker,
        max_batch_size=_int_field(spec, "max_batch_size", 1),
        mime=_str_field(spec, "mime"),
        stages=stages,
        worker_id=_env_count(env, "NATSERVE_WORKER_ID", 1),
    )


def resolve_worker(ref: str) -> Type[Worker]:
    """The `Worker` subclass ``module:qualname`` names (``Outer.Inner`` for a nested one)."""
    module_name, _, qualname = ref.partition(":")
    if "<locals>" in qualname:
        raise WorkerSpecError(
            f"worker {ref!r} is defined inside a function; define it at module level"
        )
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise WorkerSpecError(f"cannot import the module of worker {ref!r}: {err}") from err
    found: Any = module
    for part in qualname.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            where = getattr(module, "__file__", None) or module_name
            raise WorkerSpecError(
                f"worker {ref!r}: {where} has no {qualname!r} once imported; define the class "
                "at module level, outside any `if __name__ == '__main__':` block"
            ) from None
    if not (isinstance(found, type) and issubclass(found, Worker)):
        raise WorkerSpecError(f"worker {ref!r} is {found!r}, not a natserve.Worker subclass")
    return found


def import_script(path: str, argv: Sequence[str]) -> Any:
    """Imports the user's script as multiprocessing's spawn does; returns the module.

    The module is named ``__mp_main__`` and also registered as ``__main__`` (so
    ``__main__:Cls`` resolves, and pickle finds classes by that name), ``sys.argv`` is
    what the user started the launcher with, and, as ``python SCRIPT`` would, the script's
    directory replaces the current one at the front of ``sys.path``.
    """
    global _importing_script
    path = os.path.abspath(path)
    sys.argv = [path, *argv]
    if not getattr(sys.flags, "safe_path", False):  # -P / PYTHONSAFEPATH (3.11+) add neither
        # `python -m` put the working directory first; `python SCRIPT` puts its directory.
        if sys.path and sys.path[0] in ("", os.getcwd()):
            sys.path[0] = os.path.dirname(path)
        else:
            sys.path.insert(0, os.path.dirname(path))
    loader = importlib.machinery.SourceFileLoader(SCRIPT_MODULE, path)
    spec = importlib.util.spec_from_file_location(SCRIPT_MODULE, path, loader=loader)
    if spec is None:
        raise ImportError(f"cannot load {path} as a Python script")
    module = importlib.util.module_from_spec(spec)
    # As for a script run directly (and as spawn expects in its children), __main__ has no
    # spec; multiprocessing inside a worker then re-imports the script by path.
    module.__spec__ = None
    sys.modules[SCRIPT_MODULE] = module
    sys.modules["__main__"] = module
    _importing_script = True
    try:
        loader.exec_module(module)
    finally:
        _importing_script = False
    return module


def build_worker(cls: Type[Worker], *, worker_id: int, stage: int, max_batch_size: int) -> Worker:
    """Creates the user's worker with its identity set before its ``__init__`` runs."""
    worker = cls.__new__(cls)
    worker.worker_id = worker_id
    worker.stage = stage
    worker.max_batch_size = max_batch_size
    cls.__init__(worker)
    return worker


def warm_up(worker: Worker, *, strict: Optional[bool] = None) -> int:
    """Mosec's warm-up: `forward` on each of ``multi_examples`` or else on ``example``,
    each passed exactly as given (so a batching stage's example is already a list).
    Returns how many calls succeeded.

    As in Mosec, an example that is not set (None or empty) means no warm-up, and a
    warm-up that raises is logged and the worker serves anyway. With
    ``strict_warmup = True`` on the class (or ``strict=True``, as ``--dry-run`` asks)
    the exception propagates instead, and the worker never reports ready.
    """
    strict = worker.strict_warmup if strict is None else strict
    examples: List[Any] = (
        list(worker.multi_examples)
        if worker.multi_examples
        else ([worker.example] if worker.example is not None else [])
    )
    for i, example in enumerate(examples):
        try:
            worker.forward(example)
        except Exception:
            if strict:
                raise
            logger.exception(
                "warm-up %d of %d failed; serving anyway (set strict_warmup = True on the "
                "worker to refuse): check that its example is what forward expects",
                i + 1,
                len(examples),
            )
            return i
    return len(examples)


def serve(
    sock: socket.socket,
    cls: Type[Worker],
    spec: WorkerSpec,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> int:
    """Serves ``spec``'s stage with ``cls`` over a connected socket until the agent closes
    it; returns the exit code."""
    conn = Connection(sock, max_frame)
    try:
        return _serve(conn, cls, spec)
    finally:
        conn.close()


def _serve(conn: Connection, cls: Type[Worker], spec: WorkerSpec) -> int:
    try:
        worker = build_worker(
            cls, worker_id=spec.worker_id, stage=spec.stage, max_batch_size=spec.max_batch_size
        )
        warmed = warm_up(worker)
    except Exception:
        logger.exception(
            "worker %s failed to start; check its __init__ (and, with strict_warmup, that "
            "its example is what forward expects)",
            spec.name,
        )
        return 1
    running = Running(conn)
    runner = BatchRunner(worker, first=spec.first, last=spec.last, running=running)
    try:
        running.write(Ready(pid=os.getpid(), reads_ids=True, reads_edges=True))
        logger.info("worker %s ready (pid %d, %d warm-up examples)", spec.name, os.getpid(), warmed)
        while True:
            frame = running.next_frame()
            if frame is None:
                logger.debug("agent closed the socket; exiting")
                return 0
            if isinstance(frame, Cancel):
                running.cancel(frame.id, frame.index)
                continue
            if not isinstance(frame, Batch):
                logger.error("agent sent an unexpected %s frame; exiting", type(frame).__name__)
                return 1
            running.start(frame.id)
            try:
                results = runner.run(frame.items, frame.ids, frame.edges)
            finally:
                running.finish()
            running.write(Results(id=frame.id, items=results))
    except FrameError as err:
        logger.error("bad frame from the agent: %s; exiting", err)
        return 1
    except OSError as err:
        logger.error("socket to the agent failed: %s; exiting", err)
        return 1


def _connect(path: str) -> Optional[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as err:
        logger.error("cannot connect to the agent's socket %r: %s", path, err)
        sock.close()
        return None
    return sock


def main(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> int:
    """Entry point of a worker process: ``argv`` is the user's script, then its arguments."""
    env = os.environ if env is None else env
    if not argv:
        configure("info")
        logger.error("no script to import: run as `python -m natserve._worker_main SCRIPT ...`")
        return 1
    script, args = argv[0], list(argv[1:])
    settings, _ = parse_settings(args, env)
    configure(settings.log_level, log_format=settings.log_format)
    try:
        spec = spec_from_env(env)
    except WorkerSpecError as err:
        logger.error("cannot start a worker: %s", err)
        return 1
    configure(settings.log_level, prefix=spec.label, log_format=settings.log_format)
    try:
        import_script(script, args)
    except Exception:
        logger.exception("cannot start worker %s: importing %s failed", spec.name, script)
        return 1
    try:
        cls = resolve_worker(spec.worker)
    except WorkerSpecError as err:
        logger.error("cannot start worker %s: %s", spec.name, err)
        return 1
    if cls.resp_mime_type != spec.mime:
        # The agent labels responses with the spec's type; differing means the launcher
        # and this process did not import the same code.
        logger.warning(
            "worker %s declares resp_mime_type %r but the agent was told %r; responses carry %r",
            spec.name,
            cls.resp_mime_type,
            spec.mime,
            spec.mime,
        )
    sock = _connect(env.get("NATSERVE_SOCKET", ""))
    if sock is None:
        return 1
    return serve(sock, cls, spec)
