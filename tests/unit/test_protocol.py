"""The frame codec against the golden vectors shared with the Rust side."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any, Dict

import pytest

from natserve._protocol import (
    DEFAULT_MAX_FRAME,
    Batch,
    Cancel,
    Connection,
    CutFrameError,
    Frame,
    FrameError,
    ItemResult,
    Ready,
    Results,
    Status,
    Stream,
    check,
    encode,
    parse,
)

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "golden" / "frames.json").read_text())


def frame_from_json(v: Dict[str, Any]) -> Frame:
    if v["kind"] == "ready":
        return Ready(
            pid=v["pid"],
            reads_ids=v.get("reads_ids", False),
            reads_edges=v.get("reads_edges", False),
        )
    if v["kind"] == "batch":
        ids = [(r, t) for r, t in v.get("ids", [])]
        items = [s.encode() for s in v["items"]]
        return Batch(id=v["id"], items=items, ids=ids, edges=list(v.get("edges", [])))
    if v["kind"] == "stream":
        return Stream(id=v["id"], index=v["index"], body=v["body"].encode())
    if v["kind"] == "cancel":
        return Cancel(id=v["id"], index=v["index"])
    return Results(
        id=v["id"],
        items=[
            ItemResult(status=Status[item["status"].upper()], body=item["body"].encode())
            for item in v["items"]
        ],
    )


@pytest.mark.parametrize("case", GOLDEN["valid"], ids=lambda c: c["name"])
def test_golden_valid_frames_encode_and_parse(case: Dict[str, Any]) -> None:
    data = bytes.fromhex(case["hex"])
    frame = frame_from_json(case["frame"])
    assert encode(frame) == data
    assert check(data, DEFAULT_MAX_FRAME) == len(data)
    assert parse(data) == frame


@pytest.mark.parametrize("case", GOLDEN["invalid"], ids=lambda c: c["name"])
def test_golden_invalid_frames_are_rejected(case: Dict[str, Any]) -> None:
    data = bytes.fromhex(case["hex"])
    with pytest.raises(FrameError):
        n = check(data, GOLDEN["max_frame"])
        if n is None:
            raise FrameError("incomplete")
        parse(data[:n])


def test_invalid_vectors_are_rejected_by_a_connection() -> None:
    """A reader over a socket refuses each invalid vector instead of waiting for more."""
    for case in GOLDEN["invalid"]:
        a, b = socket.socketpair()
        with a, b:
            b.settimeout(5)
            a.sendall(bytes.fromhex(case["hex"]))
            a.shutdown(socket.SHUT_WR)
            with pytest.raises(FrameError):
                Connection(b, GOLDEN["max_frame"]).read_frame()


def test_status_names_are_the_outcomes() -> None:
    assert [s.outcome for s in Status] == [
        "ok",
        "validation_error",
        "client_error",
        "server_error",
    ]
    assert [int(s) for s in Status] == [0, 1, 2, 3]


def test_partial_frames_need_more_bytes() -> None:
    data = encode(Batch(id=7, items=[b"abc"]))
    for cut in range(len(data)):
        assert check(data[:cut]) is None
    assert check(data + b"\x00") == len(data)


def test_oversized_length_is_rejected_from_the_prefix_alone() -> None:
    with pytest.raises(FrameError, match="exceeds the maximum of 1024"):
        check(b"\xff\xff\xff\xff", 1024)


def test_connection_rejects_a_huge_length_without_waiting_for_the_body() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(2)  # reading the body would time out instead of raising FrameError
        a.sendall(struct.pack(">IB", 2**31, 2))
        with pytest.raises(FrameError, match="exceeds the maximum"):
            Connection(b, 1024).read_frame()


def test_connection_round_trip_and_clean_eof() -> None:
    a, b = socket.socketpair()
    frames = [
        Ready(pid=1),
        Batch(id=2**64 - 1, items=[b"", b"x" * 100_000]),
        Results(id=3, items=[ItemResult(Status.CLIENT_ERROR, b"decoding error: no")]),
    ]
    with a, b:
        b.settimeout(5)
        writer = Connection(a)
        for frame in frames:
            writer.write_frame(frame)
        a.shutdown(socket.SHUT_WR)
        reader = Connection(b)
        assert [reader.read_frame() for _ in frames] == frames
        assert reader.read_frame() is None


def test_polling_takes_whole_frames_and_keeps_the_rest_for_the_next_read() -> None:
    a, b = socket.socketpair()
    first, second = encode(Cancel(id=7, index=1)), encode(Batch(id=8, items=[b"x" * 1000]))
    with a, b:
        b.settimeout(5)
        reader = Connection(b)
        assert reader.poll_frames() == []  # nothing yet, and no wait for it
        a.sendall(first + second[:9])
        assert reader.poll_frames() == [Cancel(id=7, index=1)]
        assert reader.poll_frames() == []
        a.sendall(second[9:])
        a.shutdown(socket.SHUT_WR)
        assert reader.read_frame() == Batch(id=8, items=[b"x" * 1000])
        assert reader.poll_frames() == []
        assert reader.read_frame() is None


def test_a_close_seen_by_a_poll_ends_the_next_read() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode(Ready(pid=3)))
        a.shutdown(socket.SHUT_WR)
        reader = Connection(b)
        assert reader.poll_frames() == [Ready(pid=3)]
        assert reader.read_frame() is None


def test_polling_rejects_a_huge_length_from_the_prefix() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", DEFAULT_MAX_FRAME + 1))
        with pytest.raises(FrameError):
            Connection(b).poll_frames()


@pytest.mark.parametrize("cut", [2, 4, 7])
def test_connection_reports_a_cut_frame(cut: int) -> None:
    data = encode(Ready(pid=9))
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(data[:cut])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(CutFrameError):
            Connection(b).read_frame()
