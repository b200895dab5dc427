"""Framing: length-prefixed frames survive any chunking; bad lengths and EOF mid-frame fail."""

from __future__ import annotations

import itertools
import struct

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from ipc.errors import ProtocolError
from ipc.framing import MAX_FRAME, FrameReader, send_frame


def _encode(payloads: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in payloads)


async def _read_all(reader: FrameReader) -> list[bytes]:
    frames = []
    while (frame := await reader.receive_frame()) is not None:
        frames.append(frame)
    return frames


async def test_round_trip() -> None:
    left, right = trio.testing.memory_stream_pair()
    payloads = [b"hello", b"", b"\x00" * 10, b"world"]
    for p in payloads:
        await send_frame(left, p)
    await left.aclose()
    assert await _read_all(FrameReader(right)) == payloads


async def test_wire_format_is_big_endian_length_prefix() -> None:
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    await send_frame(send_stream, b"abc")
    assert await receive_stream.receive_some() == b"\x00\x00\x00\x03abc"


async def test_payload_larger_than_one_read() -> None:
    left, right = trio.testing.memory_stream_pair()
    big = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB: several reads of the 1 MiB cap
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_frame, left, big)
        assert await FrameReader(right).receive_frame() == big


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
)
async def test_any_chunking_decodes_to_the_same_frames(
    payloads: list[bytes], cuts: list[int]
) -> None:
    wire = _encode(payloads)
    bounds = sorted({c for c in cuts if c < len(wire)} | {0, len(wire)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(bounds)]
    left, right = trio.testing.memory_stream_pair()
    received: list[bytes] = []

    async def read() -> None:
        received.extend(await _read_all(FrameReader(right)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for chunk in chunks:
            await left.send_all(chunk)
            # Let the reader take this chunk alone, so reads see exactly these boundaries.
            await trio.testing.wait_all_tasks_blocked()
        await left.aclose()
    assert received == payloads


async def test_oversize_frame_on_write_sends_nothing() -> None:
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    with pytest.raises(ProtocolError, match="MAX_FRAME"):
        await send_frame(send_stream, bytes(MAX_FRAME + 1))
    await send_stream.aclose()
    assert await receive_stream.receive_some() == b""


async def test_oversize_length_on_read() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="MAX_FRAME"):
        await FrameReader(right).receive_frame()


async def test_max_frame_itself_is_allowed() -> None:
    left, right = trio.testing.memory_stream_pair()
    payload = bytes(MAX_FRAME)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_frame, left, payload)
        assert await FrameReader(right).receive_frame() == payload


@pytest.mark.parametrize(
    ("wire", "whole_frames"),
    [
        pytest.param(b"\x00\x00", 0, id="in-header"),
        pytest.param(b"\x00\x00\x00\x05ab", 0, id="in-payload"),
        pytest.param(b"\x00\x00\x00\x05", 0, id="after-header"),
        pytest.param(_encode([b"ok"]) + b"\x00\x00\x00\x01", 1, id="after-a-whole-frame"),
    ],
)
async def test_eof_mid_frame(wire: bytes, whole_frames: int) -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(wire)
    await left.aclose()
    reader = FrameReader(right)
    for _ in range(whole_frames):
        assert await reader.receive_frame() is not None
    with pytest.raises(ProtocolError, match="EOF"):
        await reader.receive_frame()


async def test_clean_eof_is_none_and_stays_none() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.aclose()
    reader = FrameReader(right)
    assert await reader.receive_frame() is None
    assert await reader.receive_frame() is None
