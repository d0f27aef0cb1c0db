"""Ctrl-C or SIGTERM on `python exp.py` stops everything in order, nats-server included,
and leaves no process behind."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from harness import EXAMPLES, alive, descendants, started_app


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_every_process(tmp_path: Path, sig: int) -> None:
    cluster, _base, proc = started_app(tmp_path, EXAMPLES / "exp.py")
    try:
        family = descendants(proc.pid)
        names = {Path(f"/proc/{p}/exe").resolve().name for p in family if alive(p)}
        # nats-server, the ingress, the agent and exp.py's two worker processes.
        assert {"nats-server", "natserve-ingress", "natserve-agent"} <= names, names
        assert len(family) >= 5, family
        assert proc.stop(sig, timeout=60) == 0, proc.output()[-3000:]
        deadline = time.monotonic() + 10
        while any(alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in family if alive(p)], proc.output()[-3000:]
    finally:
        cluster.stop_all()
