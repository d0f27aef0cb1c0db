"""Worker processes import the user's program without running its main block, and get
their stage from the agent: a main block that binds a port and records itself runs once,
in the launcher, and the service still answers."""

from __future__ import annotations

from pathlib import Path

from harness import APPS, free_port, http, started_app


def test_workers_never_run_the_main_block(tmp_path: Path) -> None:
    log = tmp_path / "main-block.log"
    env = {
        "SIDE_PORT": str(free_port()),
        "MAIN_BLOCK_LOG": str(log),
        # the script's own flag, declared so the launcher does not refuse it
        "NATSERVE_SCRIPT_FLAGS": "--app-flag",
    }
    cluster, base, proc = started_app(tmp_path, APPS / "main_block.py", "--app-flag", "7", env=env)
    try:
        seen = [http("POST", base + "/inference", b"{}") for _ in range(6)]
        assert all(r.status == 200 for r in seen), seen
        answers = [r.json() for r in seen]
        pids = {a["pid"] for a in answers}  # type: ignore[index]
        assert proc.pid not in pids
        for answer in answers:
            assert answer["module"] == "__mp_main__"  # type: ignore[index]
            assert "--app-flag" in answer["argv"]  # type: ignore[index]
            assert (answer["stage"], answer["batch"]) == (0, 4)  # type: ignore[index]
            assert answer["worker_id"] in (1, 2)  # type: ignore[index]
        # the launcher alone ran it: no worker bound the port or wrote a line
        assert log.read_text().split() == [str(proc.pid)], proc.output()[-3000:]
        assert "Address already in use" not in proc.output()
    finally:
        cluster.stop_all()
