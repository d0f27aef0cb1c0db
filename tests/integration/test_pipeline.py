"""The pipeline example under 64 concurrent clients: every answer is its own, and the
batched stage really batches."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness import EXAMPLES, http, started_app


@pytest.mark.parametrize("prefetch", ["0", "1"])
def test_concurrent_requests_get_their_own_answers(tmp_path: Path, prefetch: str) -> None:
    env = {"NATSERVE_PREFETCH": prefetch}
    cluster, base, _ = started_app(tmp_path, EXAMPLES / "pipeline.py", env=env)
    try:

        def one(i: int) -> tuple[int, int, object]:
            r = http("POST", base + "/inference", json.dumps({"x": i}).encode())
            return i, r.status, r.json() if r.status == 200 else r.text

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, range(640)))
        for i, status, body in results:
            assert status == 200, (i, body)
            assert body["x"] == i and body["y"] == 2 * i, (i, body)  # type: ignore[index]
        assert max(b["batch"] for _, _, b in results) > 1  # type: ignore[index]

        text = http("GET", base + "/metrics").text
        count = re.search(
            r'natserve_stage_batch_size_count\{route="/inference",stage="1"\} (\d+)', text
        )
        ones = re.search(
            r'natserve_stage_batch_size_bucket\{route="/inference",stage="1",le="1"\} (\d+)', text
        )
        assert count and ones, text
        assert int(ones.group(1)) < int(count.group(1)), "no request ran in a batch larger than one"
    finally:
        cluster.stop_all()
