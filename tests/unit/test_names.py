"""The Python side of the NATS names, against ``tests/golden/names.json`` — the file the
Rust ``protocol/src/names.rs`` is tested against too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import pytest

from natserve._names import (
    inbox_prefix,
    is_namespace,
    is_route,
    payloads_bucket,
    reply_prefix,
    results_bucket,
    route_slug,
    work_subject,
)

GOLDEN: Dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "golden" / "names.json").read_text()
)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: str(c["route"]))
def test_names_match_the_golden_file(case: Dict[str, Any]) -> None:
    namespace, route = case["namespace"], case["route"]
    assert is_namespace(namespace) and is_route(route)
    slug = route_slug(route)
    assert slug == case["slug"]
    assert [work_subject(namespace, slug, i) for i in range(len(case["work_subjects"]))] == case[
        "work_subjects"
    ]
    assert payloads_bucket(namespace) == case["payloads_bucket"]
    assert reply_prefix(namespace, case["reply_prefix"]["id"]) == case["reply_prefix"]["prefix"]
    assert inbox_prefix(namespace, case["inbox_prefix"]["role"]) == case["inbox_prefix"]["prefix"]
    assert results_bucket(namespace) == case["results_bucket"]


@pytest.mark.parametrize("route", GOLDEN["invalid_routes"])
def test_invalid_routes_are_refused(route: str) -> None:
    assert not is_route(route)
    with pytest.raises(ValueError):
        route_slug(route)


@pytest.mark.parametrize("namespace", GOLDEN["invalid_namespaces"])
def test_invalid_namespaces_are_refused(namespace: str) -> None:
    assert not is_namespace(namespace)
