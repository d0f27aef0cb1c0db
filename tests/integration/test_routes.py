"""Several routes in one program, each its own pipeline, served side by side."""

from __future__ import annotations

from pathlib import Path

from harness import APPS, http, started_app


def test_each_route_runs_its_own_pipeline(tmp_path: Path) -> None:
    cluster, base, _ = started_app(tmp_path, APPS / "two_routes.py")
    try:
        r = http("POST", base + "/v1/upper", b'{"text": "hello world"}')
        assert (r.status, r.json()) == (200, {"text": "HELLO WORLD"})
        r = http("POST", base + "/v1/count", b'{"text": "one two three"}')
        assert (r.status, r.json()) == (200, {"words": 3})
        assert http("POST", base + "/v1", b"{}").status == 404
        assert http("POST", base + "/inference", b"{}").status == 404
    finally:
        cluster.stop_all()
