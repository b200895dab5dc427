"""Property tests of the SMPP PDU reader and session (sans-IO) on hostile input.

Whatever the bytes, the only exception that may leave PduReader.feed, decode or
Session.receive_data is PduError (FramingError when the stream cannot be split any more),
every request the session cannot read can still be answered, no example runs longer than
EXAMPLE_SECONDS, and valid PDUs decode the same however the stream is cut.
"""

from __future__ import annotations

import itertools
import signal
import struct
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channel_proc.transports.smpp.pdu import (
    COMMAND_IDS,
    HEADER_SIZE,
    MAX_PDU_LENGTH,
    FramingError,
    Pdu,
    PduError,
    PduReader,
    decode,
    encode,
)
from channel_proc.transports.smpp.session import (
    Answered,
    BindMode,
    PeerUnbound,
    Replied,
    Requested,
    Session,
    Unreadable,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Longest one example may take: a parser that loops forever fails instead of hanging.
EXAMPLE_SECONDS: Final = 2.0
#: Examples per property; all of them together run in a few seconds.
EXAMPLES: Final = 200
FUZZ: Final = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

pytestmark = pytest.mark.slow


class ExampleTimeoutError(Exception):
    pass


@contextmanager
def bounded() -> Iterator[None]:
    """Fail an example that runs past EXAMPLE_SECONDS (SIGALRM interrupts pure-Python loops)."""

    def expire(signum: int, frame: object) -> None:
        raise ExampleTimeoutError(f"example ran longer than {EXAMPLE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, EXAMPLE_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def any_pdu_outcome() -> Iterator[None]:
    """A decode either succeeds or raises PduError; anything else propagates."""
    with suppress(PduError):
        yield


def bound_session(mode: BindMode = BindMode.TRANSCEIVER) -> Session:
    session = Session(mode)
    bind = session.bind({"system_id": "esme", "password": "pw"})
    session.receive_data(encode(Pdu(f"{mode.value}_resp", bind.pdu.sequence)))
    return session


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_session(session: Session, pieces: list[bytes]) -> list[object]:
    """Feed `pieces`; check every event is one the session documents and can be answered."""
    events: list[object] = []
    for piece in pieces:
        try:
            new = session.receive_data(piece)
        except FramingError:
            # The stream is unusable: the transport closes the connection here.
            break
        for event in new:
            assert isinstance(event, Answered | Requested | Replied | Unreadable | PeerUnbound)
            if isinstance(event, Replied):
                decode(event.data)
            elif isinstance(event, Unreadable):
                _, data = session.respond(event.error, 0x45)
                decode(data)
            elif isinstance(event, Requested):
                # What reaches the application is whole: the mandatory parameters are there.
                assert {"source_addr", "destination_addr", "esm_class"} <= set(event.pdu.params)
                _, data = session.respond(event.pdu, 0)
                decode(data)
        events.extend(new)
    return events


# --- strategies ----------------------------------------------------------------------------

known_ids = st.sampled_from(sorted(COMMAND_IDS.values()))
command_ids = st.one_of(known_ids, st.integers(0, 2**32 - 1))
u32 = st.integers(0, 2**32 - 1)


@st.composite
def framed_junk(draw: st.DrawFn) -> bytes:
    """A header with a right command_length, a (mostly known) command id, and any body."""
    body = draw(st.binary(max_size=300))
    command_id = draw(command_ids)
    return struct.pack(">LLLL", HEADER_SIZE + len(body), command_id, draw(u32), draw(u32)) + body


@st.composite
def tlv_junk(draw: st.DrawFn) -> bytes:
    """A deliver_sm with valid mandatory parameters followed by arbitrary TLV bytes."""
    head = encode(Pdu("deliver_sm", draw(st.integers(1, 0x7FFFFFFF)), params={}))
    tail = draw(
        st.one_of(
            st.binary(max_size=80),
            st.builds(
                lambda tag, length, value: struct.pack(">HH", tag, length) + value,
                st.integers(0, 0xFFFF),
                st.integers(0, 0xFFFF),
                st.binary(max_size=40),
            ),
        )
    )
    body = head[HEADER_SIZE:] + tail
    return struct.pack(">L", HEADER_SIZE + len(body)) + head[4:HEADER_SIZE] + body


ascii_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
sequences = st.integers(1, 0x7FFFFFFF)


def valid_pdus() -> st.SearchStrategy[Pdu]:
    """PDUs an SMSC may send us, with parameters of every kind (C strings, ints, octets, TLVs)."""
    deliver = st.builds(
        lambda seq, src, dst, esm, dc, sm: Pdu(
            "deliver_sm",
            seq,
            params={
                "source_addr": src,
                "destination_addr": dst,
                "esm_class": esm,
                "data_coding": dc,
                "short_message": sm,
            },
        ),
        sequences,
        ascii_text,
        ascii_text,
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(min_size=1, max_size=140),
    )
    receipt = st.builds(
        lambda seq, mid, state: Pdu(
            "deliver_sm",
            seq,
            params={"esm_class": 4, "receipted_message_id": mid, "message_state": state},
        ),
        sequences,
        ascii_text.filter(bool),
        st.integers(0, 8),
    )
    payload = st.builds(
        lambda seq, data: Pdu("data_sm", seq, params={"message_payload": data}),
        sequences,
        st.binary(min_size=1, max_size=2000),
    )
    simple = st.builds(
        Pdu,
        st.sampled_from(["enquire_link", "enquire_link_resp", "unbind", "generic_nack"]),
        sequences,
    )
    submit_resp = st.builds(
        lambda seq, status, mid: Pdu("submit_sm_resp", seq, status, {"message_id": mid}),
        sequences,
        st.integers(0, 0x100),
        ascii_text,
    )
    return st.one_of(deliver, receipt, payload, simple, submit_resp)


# --- properties ------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_reader_on_arbitrary_bytes_raises_only_framing_errors(data: bytes, cuts: list[int]) -> None:
    reader = PduReader()
    error: FramingError | None = None
    with bounded():
        try:
            for piece in chunks(data, cuts):
                for frame in reader.feed(piece):
                    assert HEADER_SIZE <= len(frame) <= MAX_PDU_LENGTH
                    with any_pdu_outcome():
                        decode(frame)
                # Never more than one unfinished frame is held.
                assert reader.buffered < MAX_PDU_LENGTH
        except FramingError as exc:
            error = exc
    assert error is None or "command_length" in error.reason


@FUZZ
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_session_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    with bounded():
        feed_session(bound_session(), chunks(data, cuts))


@FUZZ
@given(frames=st.lists(st.one_of(framed_junk(), tlv_junk()), min_size=1, max_size=5))
def test_session_on_valid_headers_with_junk_bodies(frames: list[bytes]) -> None:
    """Framing holds, so every frame gives exactly what its header promises: a PDU, or an
    event the session can answer; the session stays usable after each."""
    session = bound_session()
    with bounded():
        for frame in frames:
            with any_pdu_outcome():
                decode(frame)
            feed_session(session, [frame])
        ping = encode(Pdu("enquire_link", 4242))
        if session.state.value == "bound":
            [reply] = session.receive_data(ping)
            assert isinstance(reply, Replied)
            assert decode(reply.data) == Pdu("enquire_link_resp", 4242)


@FUZZ
@given(
    length=st.one_of(st.integers(0, HEADER_SIZE - 1), st.integers(MAX_PDU_LENGTH + 1, 2**32 - 1)),
    rest=st.binary(max_size=64),
)
def test_impossible_command_length_is_refused_at_once(length: int, rest: bytes) -> None:
    reader = PduReader()
    with bounded(), pytest.raises(FramingError, match=f"invalid command_length {length}"):
        reader.feed(struct.pack(">L", length) + rest)


@FUZZ
@given(
    pdus=st.lists(valid_pdus(), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 20_000), max_size=30),
)
def test_valid_pdus_decode_the_same_however_split(pdus: list[Pdu], cuts: list[int]) -> None:
    wire = [encode(pdu) for pdu in pdus]
    whole = [decode(frame) for frame in wire]
    reader = PduReader()
    with bounded():
        frames = [frame for piece in chunks(b"".join(wire), cuts) for frame in reader.feed(piece)]
    assert frames == wire
    assert [decode(frame) for frame in frames] == whole
    assert reader.buffered == 0
    for pdu, decoded in zip(pdus, whole, strict=True):
        assert (decoded.command, decoded.sequence, decoded.status) == (
            pdu.command,
            pdu.sequence,
            pdu.status,
        )
        for name, value in pdu.params.items():
            assert decoded.params.get(name) == value, name


@FUZZ
@given(pdus=st.lists(valid_pdus(), min_size=1, max_size=8), cuts=st.lists(st.integers(0, 20_000)))
def test_session_events_do_not_depend_on_the_split(pdus: list[Pdu], cuts: list[int]) -> None:
    wire = b"".join(encode(pdu) for pdu in pdus)
    with bounded():
        at_once = feed_session(bound_session(), [wire])
        split = feed_session(bound_session(), chunks(wire, cuts))
    assert split == at_once
