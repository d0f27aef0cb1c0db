"""schemathesis against the live OpenAPI document of the exp example: every request it
generates from the document is answered, and none with a 5xx of natserve's own (a 503
would mean the service was not ready, which it is). Bounded in examples and time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from harness import EXAMPLES, started_app


def test_no_generated_request_gets_a_server_error(tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")
    assert st.exists() or shutil.which("st"), "schemathesis is installed by make install"
    cluster, base, _ = started_app(tmp_path, EXAMPLES / "exp.py")
    try:
        out = subprocess.run(
            [
                str(st) if st.exists() else "st", "run", f"{base}/openapi/metadata.json",
                "--checks", "not_a_server_error",
                "--max-examples", "60",
                "--phases", "examples,fuzzing",
                "--request-timeout", "10",
                "--max-response-time", "10",
                "--no-color",
            ],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
        )  # fmt: skip
    finally:
        cluster.stop_all()
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-4000:]
    assert "POST /inference" in report, report[-4000:]
