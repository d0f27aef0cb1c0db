"""Property tests of the Python frame decoder on arbitrary and mutated bytes: it raises
`FrameError` or returns a frame that encodes back to exactly its input, never anything
else. ``NATSERVE_FUZZ_EXAMPLES`` raises the example count (``make fuzz``)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natserve._protocol import (
    Batch,
    Frame,
    FrameError,
    ItemResult,
    Ready,
    Results,
    Status,
    check,
    encode,
    parse,
)

EXAMPLES = int(os.environ.get("NATSERVE_FUZZ_EXAMPLES", "1500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX = 1 << 16

frames = st.one_of(
    st.builds(Ready, pid=st.integers(0, 2**32 - 1), reads_ids=st.booleans()),
    st.builds(
        Batch, id=st.integers(0, 2**64 - 1), items=st.lists(st.binary(max_size=64), max_size=8)
    ),
    st.lists(
        st.tuples(st.binary(max_size=64), st.text(max_size=40), st.text(max_size=40)),
        min_size=1,
        max_size=8,
    ).flatmap(
        lambda items: st.builds(
            Batch,
            id=st.integers(0, 2**64 - 1),
            items=st.just([body for body, _, _ in items]),
            ids=st.just([(request, trace) for _, request, trace in items]),
        )
    ),
    st.lists(
        st.tuples(st.binary(max_size=64), st.text(max_size=40), st.integers(0, 3)),
        min_size=1,
        max_size=8,
    ).flatmap(
        lambda items: st.builds(
            Batch,
            id=st.integers(0, 2**64 - 1),
            items=st.just([body for body, _, _ in items]),
            ids=st.just([(request, "") for _, request, _ in items]),
            edges=st.just([edge for _, _, edge in items]),
        )
    ),
    st.builds(
        Results,
        id=st.integers(0, 2**64 - 1),
        items=st.lists(
            st.builds(ItemResult, status=st.sampled_from(Status), body=st.binary(max_size=64)),
            max_size=8,
        ),
    ),
)


def decode_or_reject(data: bytes) -> None:
    """The decoder's contract on any input."""
    try:
        whole = parse(data)
    except FrameError:
        pass
    else:
        assert encode(whole) == data, "a frame parses only from its one encoding"
    try:
        n = check(data, MAX)
    except FrameError:
        return
    if n is None:
        return
    try:
        frame: Frame = parse(data[:n])
    except FrameError:
        return
    assert encode(frame) == data[:n]


@FUZZ
@given(st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_raise_frame_error(data: bytes) -> None:
    decode_or_reject(data)


@FUZZ
@given(frames, st.data())
def test_mutated_frames_decode_or_raise_frame_error(frame: Frame, data: st.DataObject) -> None:
    raw = bytearray(encode(frame))
    assert parse(bytes(raw)) == frame
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    decode_or_reject(bytes(raw[:cut]))
    decode_or_reject(bytes(raw))
