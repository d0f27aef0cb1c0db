"""The Python side of the results bucket's records, against ``tests/golden/results.json``
— the file the Rust ``protocol/src/records.rs`` is tested against too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import pytest

from natserve._results import (
    ResultRecord,
    decode_record,
    idempotent_result_id,
    is_idempotency_key,
    is_result_id,
)

GOLDEN: Dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "golden" / "results.json").read_text()
)


@pytest.mark.parametrize("case", GOLDEN["idempotent_ids"], ids=lambda c: str(c["key"]))
def test_idempotent_ids_match_the_golden_file(case: Dict[str, str]) -> None:
    result_id = idempotent_result_id(case["route"], case["key"])
    assert result_id == case["id"]
    assert is_result_id(result_id)


@pytest.mark.parametrize("case", GOLDEN["records"], ids=lambda c: str(c["record"]["state"]))
def test_records_match_the_golden_file(case: Dict[str, Any]) -> None:
    record, body = decode_record(case["value"].encode())
    assert record == ResultRecord(**case["record"])
    assert body == case["body"].encode()
    assert record.encode(body) == case["value"].encode()


@pytest.mark.parametrize("value", GOLDEN["invalid_values"])
def test_invalid_values_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        decode_record(value.encode())


@pytest.mark.parametrize("result_id", GOLDEN["invalid_ids"])
def test_invalid_ids_are_refused(result_id: str) -> None:
    assert not is_result_id(result_id)


def test_idempotency_keys_are_visible_ascii() -> None:
    assert is_idempotency_key("order 1234")
    for bad in ("", "x" * 256, "tab\there", "ünï"):
        assert not is_idempotency_key(bad)
