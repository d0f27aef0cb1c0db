"""A worker process as the agent starts it: ``python -m natserve._worker_main SCRIPT ...``
with the stage's spec in its environment. It imports the script without running its main
block and takes every stage parameter from the spec."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import msgpack
import pytest

from natserve import Server, Worker, _worker
from natserve._agent_config import WORKER_ENTRY
from natserve._protocol import Batch, Connection, Ready, Results, Status
from natserve._worker import WorkerSpecError, resolve_worker, spec_from_env

REPO = Path(__file__).resolve().parents[2]

APP = """
import os, sys
from natserve import Server, Worker

class Report(Worker):
    def forward(self, data):
        return {
            "got": data,
            "argv": sys.argv,
            "module": __name__,
            "main_is_this_module": sys.modules["__main__"] is sys.modules[__name__],
            "path0": sys.path[0],
            "identity": [self.worker_id, self.stage, self.max_batch_size],
        }

class Outer:
    class Inner(Worker):
        def forward(self, data):
            return [{"inner": item} for item in data]

if __name__ == "__main__":
    with open(os.environ["MARKER"], "a") as f:
        f.write("main block ran in pid %d\\n" % os.getpid())
    server = Server()
    server.append_worker(Report, num=3, max_batch_size=64)  # not what the spec says
    server.run()
"""


def spec(**overrides: Any) -> Dict[str, Any]:
    entry: Dict[str, Any] = {
        "route": "/inference",
        "stage": 0,
        "name": "Report",
        "worker": "__main__:Report",
        "num": 1,
        "max_batch_size": 1,
        "max_wait_ms": 0,
        "timeout_ms": 0,
        "env": None,
        "mime": "application/json",
    }
    entry.update(overrides)
    return entry


def worker_env(tmp: Path, entry: Optional[Dict[str, Any]], **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATSERVE_")}
    env.update(
        PYTHONPATH=str(REPO / "python-worker"),  # this source tree, not an installed copy
        MARKER=str(tmp / "marker"),
        NATSERVE_SOCKET=str(tmp / "w.sock"),
        NATSERVE_WORKER_STAGES="1",
        NATSERVE_WORKER_ID="2",
    )
    if entry is not None:
        env["NATSERVE_WORKER_SPEC"] = json.dumps(entry)
    env.update(extra)
    return env


def write_app(tmp: Path, text: str = APP, name: str = "app.py") -> Path:
    path = tmp / "app" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


class WorkerProcess:
    """The agent's side: a listening socket, then the worker process connecting to it."""

    def __init__(
        self, tmp: Path, script: Path, env: Dict[str, str], args: Sequence[str] = ()
    ) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(env["NATSERVE_SOCKET"])
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_ENTRY, str(script), *args],
            env=env,
            cwd=tmp,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            sock, _ = self.listener.accept()
        except OSError:
            self.proc.kill()
            raise AssertionError(f"no connection: {self.proc.communicate()[1]}") from None
        sock.settimeout(30)
        self.conn = Connection(sock)

    def ready(self) -> None:
        assert isinstance(self.conn.read_frame(), Ready)

    def batch(self, items: List[bytes]) -> Results:
        self.conn.write_frame(Batch(id=7, items=items))
        frame = self.conn.read_frame()
        assert isinstance(frame, Results)
        return frame

    def close(self) -> int:
        self.conn.close()
        self.listener.close()
        self.proc.communicate(timeout=30)
        return self.proc.returncode


def test_the_script_is_imported_without_its_main_block(tmp_path: Path) -> None:
    script = write_app(tmp_path)
    worker = WorkerProcess(
        tmp_path, script, worker_env(tmp_path, spec()), ["--port", "9", "--mine", "x"]
    )
    worker.ready()
    (item,) = worker.batch([b'{"x": 1}']).items
    assert item.status == Status.OK
    seen = json.loads(item.body)
    assert seen["got"] == {"x": 1}
    assert seen["argv"] == [str(script), "--port", "9", "--mine", "x"]  # as the user gave it
    assert seen["module"] == "__mp_main__" and seen["main_is_this_module"]
    assert seen["path0"] == str(script.parent)  # the script's directory, as `python app.py`
    # the spec's parameters, not the main block's append_worker(num=3, max_batch_size=64)
    assert seen["identity"] == [2, 0, 1]
    assert worker.close() == 0
    assert not (tmp_path / "marker").exists()


def test_stage_position_and_batch_size_come_from_the_spec(tmp_path: Path) -> None:
    script = write_app(tmp_path)
    entry = spec(stage=1, name="Inner", worker="__main__:Outer.Inner", max_batch_size=4)
    env = worker_env(tmp_path, entry, NATSERVE_WORKER_STAGES="2", NATSERVE_WORKER_ID="1")
    worker = WorkerProcess(tmp_path, script, env)
    worker.ready()
    # not the first stage: msgpack in from the previous stage; the last: JSON out
    results = worker.batch([msgpack.packb(1), msgpack.packb("a")]).items
    assert [json.loads(r.body) for r in results] == [{"inner": 1}, {"inner": "a"}]
    assert worker.close() == 0


def test_a_middle_stage_hands_msgpack_on(tmp_path: Path) -> None:
    script = write_app(tmp_path)
    env = worker_env(tmp_path, spec(stage=0), NATSERVE_WORKER_STAGES="3")
    worker = WorkerProcess(tmp_path, script, env)
    worker.ready()
    (item,) = worker.batch([b'{"x": 2}']).items
    assert msgpack.unpackb(item.body)["got"] == {"x": 2}  # first of three: JSON in, msgpack out
    assert worker.close() == 0


def test_a_script_without_a_main_guard_does_not_launch_from_a_worker(tmp_path: Path) -> None:
    script = write_app(
        tmp_path,
        """
        import os
        from natserve import Server, Worker

        class Echo(Worker):
            def forward(self, data):
                return data

        server = Server()
        server.append_worker(Echo)
        server.run()  # returns at once inside a worker process
        with open(os.environ["MARKER"], "w") as f:
            f.write("run() returned")
        """,
    )
    worker = WorkerProcess(tmp_path, script, worker_env(tmp_path, spec(worker="__main__:Echo")))
    worker.ready()
    assert worker.batch([b"[1]"]).items[0].body == b"[1]"
    assert worker.close() == 0
    assert (tmp_path / "marker").read_text() == "run() returned"


def test_a_worker_from_a_module_beside_the_script_is_found(tmp_path: Path) -> None:
    write_app(
        tmp_path,
        """
        from natserve import Worker

        class Embed(Worker):
            def forward(self, data):
                return {"embedded": data}
        """,
        name="models.py",
    )
    script = write_app(tmp_path, "from models import Embed  # noqa: F401\n")
    worker = WorkerProcess(tmp_path, script, worker_env(tmp_path, spec(worker="models:Embed")))
    worker.ready()
    assert json.loads(worker.batch([b"3"]).items[0].body) == {"embedded": 3}
    assert worker.close() == 0


@pytest.mark.parametrize(
    ("entry", "extra", "line"),
    [
        (None, {}, "NATSERVE_WORKER_SPEC is not set"),
        ("not json", {}, "NATSERVE_WORKER_SPEC is not JSON"),
        ({"route": "/inference"}, {}, "NATSERVE_WORKER_SPEC has no 'worker'"),
        (spec(worker="Report"), {}, "worker must be 'module:qualname', got 'Report'"),
        (spec(max_batch_size=0), {}, "max_batch_size must be an integer >= 1, got 0"),
        (spec(stage=1), {}, "stage 1 is not below NATSERVE_WORKER_STAGES=1"),
        (spec(), {"NATSERVE_WORKER_ID": "zero"}, "NATSERVE_WORKER_ID must be an integer >= 1"),
        (spec(worker="__main__:Nope"), {}, "has no 'Nope' once imported; define the class"),
        (spec(worker="__main__:os"), {}, "not a natserve.Worker subclass"),
        (spec(worker="no_such_module:X"), {}, "cannot import the module of worker"),
        (spec(worker="__main__:f.<locals>.X"), {}, "defined inside a function"),
    ],
)
def test_a_bad_spec_exits_1_with_a_clear_line(
    tmp_path: Path, entry: Any, extra: Dict[str, str], line: str
) -> None:
    script = write_app(tmp_path)
    env = worker_env(tmp_path, None, **extra)
    if entry is not None:
        env["NATSERVE_WORKER_SPEC"] = entry if isinstance(entry, str) else json.dumps(entry)
    done = subprocess.run(
        [sys.executable, "-m", WORKER_ENTRY, str(script)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert line in done.stderr
    assert "cannot start" in done.stderr
    assert not (tmp_path / "marker").exists()


def test_a_script_that_fails_to_import_exits_1_with_its_traceback(tmp_path: Path) -> None:
    script = write_app(tmp_path, "raise ImportError('no torch here')\n")
    done = subprocess.run(
        [sys.executable, "-m", WORKER_ENTRY, str(script)],
        env=worker_env(tmp_path, spec()),
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"importing {script} failed" in done.stderr
    assert "ImportError: no torch here" in done.stderr


def test_nobody_listening_on_the_socket_exits_1(tmp_path: Path) -> None:
    script = write_app(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", WORKER_ENTRY, str(script)],
        env=worker_env(tmp_path, spec()),
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot connect to the agent's socket" in done.stderr


class Outer:
    class Inner(Worker):
        def forward(self, data: Any) -> Any:
            return data


def test_resolve_worker_follows_nested_qualnames() -> None:
    assert resolve_worker(f"{__name__}:Outer.Inner") is Outer.Inner
    with pytest.raises(WorkerSpecError, match=r"not a natserve\.Worker subclass"):
        resolve_worker(f"{__name__}:Outer")


def test_spec_from_env_reads_the_agent_config_entry() -> None:
    parsed = spec_from_env(
        {
            "NATSERVE_WORKER_SPEC": json.dumps(spec(stage=2, max_batch_size=8)),
            "NATSERVE_WORKER_STAGES": "3",
            "NATSERVE_WORKER_ID": "4",
        }
    )
    assert (parsed.stage, parsed.max_batch_size, parsed.worker_id) == (2, 8, 4)
    assert (parsed.first, parsed.last, parsed.label) == (False, True, "[/inference:2 #4]")


def test_run_does_nothing_while_a_worker_process_imports_the_script(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_worker, "_importing_script", True)
    Server().run()  # no workers, no launcher, no SystemExit: it returns
