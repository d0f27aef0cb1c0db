"""The Python side of the claim checks, against ``tests/golden/payloads.json`` — the file
the Rust ``protocol/src/payloads.rs`` is tested against too."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict

import pytest

from natserve._names import payloads_bucket
from natserve._payloads import (
    HEADER_RESERVE,
    MAX_AGE_S,
    PAYLOAD_OBJECT,
    claim,
    inline_limit,
    object_name,
)

GOLDEN: Dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "golden" / "payloads.json").read_text()
)


def test_constants_match_the_golden_file() -> None:
    assert GOLDEN["header"] == PAYLOAD_OBJECT
    assert GOLDEN["header_reserve"] == HEADER_RESERVE
    assert GOLDEN["max_age_s"] == MAX_AGE_S


@pytest.mark.parametrize("case", GOLDEN["buckets"], ids=lambda c: str(c["namespace"]))
def test_buckets_match_the_golden_file(case: Dict[str, Any]) -> None:
    assert payloads_bucket(case["namespace"]) == case["bucket"]
    assert f"OBJ_{case['bucket']}" == case["stream"]


@pytest.mark.parametrize("case", GOLDEN["inline"], ids=lambda c: str(c["max_payload"]))
def test_the_inline_limit_matches_the_golden_file(case: Dict[str, Any]) -> None:
    assert inline_limit(case["max_payload"]) == case["limit"]


@pytest.mark.parametrize("case", GOLDEN["object_names"], ids=lambda c: str(c["hop"]))
def test_object_names_match_the_golden_file(case: Dict[str, Any]) -> None:
    name = object_name(case["request_id"], case["hop"])
    assert re.fullmatch(case["pattern"], name), name
    assert name != object_name(case["request_id"], case["hop"])


def test_a_claim_is_a_non_empty_header() -> None:
    assert claim(None) is None
    assert claim({}) is None
    assert claim({PAYLOAD_OBJECT: ""}) is None
    assert claim({PAYLOAD_OBJECT: "r.0.abc"}) == "r.0.abc"
