"""The envelope codec against the golden vectors the Rust codec is tested against."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from natserve._envelope import EnvelopeError, Letter, decode, encode

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "golden" / "envelopes.json").read_text())


@pytest.mark.parametrize("case", GOLDEN["valid"], ids=lambda c: c["name"])
def test_golden_envelopes_encode_and_decode(case: dict) -> None:  # type: ignore[type-arg]
    letters = [
        Letter(headers=[(k, v) for k, v in item["headers"]], body=item["body"].encode())
        for item in case["letters"]
    ]
    data = bytes.fromhex(case["hex"])
    assert encode(letters) == data
    assert decode(data) == letters


@pytest.mark.parametrize("case", GOLDEN["invalid"], ids=lambda c: c["name"])
def test_golden_invalid_envelopes_are_refused(case: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(EnvelopeError):
        decode(bytes.fromhex(case["hex"]))


def test_every_cut_of_an_envelope_is_refused() -> None:
    whole = encode([Letter([("X-Status", "ok")], b"abc"), Letter([], b"")])
    for cut in range(len(whole)):
        with pytest.raises(EnvelopeError):
            decode(whole[:cut])
    assert decode(whole)[0].header("x-status") == "ok"
