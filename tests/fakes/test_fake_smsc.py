"""The fake SMSC on its own: its PDU codec against the SMPP 3.4 examples, and its behaviour
seen by a raw TCP client that writes and reads bytes."""

from __future__ import annotations

import struct
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio

from channel_proc.transports.smpp.pdu import (
    STATUS_CODES,
    FramingError,
    Pdu,
    PduError,
    PduReader,
    decode,
    encode,
)
from tests.fakes.fake_smsc import (
    FRAMED_GARBAGE,
    GARBAGE,
    RINVPASWD,
    RTHROTTLED,
    SubmitAnswer,
    open_fake_smsc,
    receipt_text,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.fakes.fake_smsc import FakeSmsc

#: The 60-octet submit_sm of the SMPP 3.4 specification's PDU example (and Wikipedia's).
SPEC_SUBMIT_SM = bytes.fromhex(
    "0000003C 00000004 00000000 00000005 00 02 08 35353500 01 01 35353535353535353500"
    " 00 00 00 00 00 00 00 00 00 0F 48656C6C6F2077696B697065646961"
)
#: A submit_sm as recorded in a provider's SMPP guide: service_type, validity period, receipt.
RECORDED_SUBMIT_SM = bytes.fromhex(
    "0000006b00000004000000000005c4a34f4d5634000301383033363200010138313233343530303130303000"
    "000000003138303130353132303030303030342b0001000000255265706c792059657320746f206f707420"
    "696e206f72204e6f20746f206f7074206f75742e"
)


RX_T_APPN = STATUS_CODES["ESME_RX_T_APPN"]


def _header(length: int, command_id: int, status: int, sequence: int) -> bytes:
    return struct.pack(">LLLL", length, command_id, status, sequence)


def test_spec_submit_sm_decodes_field_by_field() -> None:
    pdu = decode(SPEC_SUBMIT_SM)
    assert (pdu.command, pdu.sequence, pdu.status) == ("submit_sm", 5, 0)
    assert pdu.params["source_addr_ton"] == 2
    assert pdu.params["source_addr_npi"] == 8
    assert pdu.params["source_addr"] == "555"
    assert pdu.params["destination_addr"] == "555555555"
    assert pdu.params["short_message"] == b"Hello wikipedia"
    assert encode(pdu) == SPEC_SUBMIT_SM


def test_recorded_submit_sm_round_trips() -> None:
    pdu = decode(RECORDED_SUBMIT_SM)
    assert pdu.params["service_type"] == "OMV4"
    assert pdu.params["validity_period"] == "180105120000004+"
    assert pdu.params["registered_delivery"] == 1
    assert pdu.params["short_message"] == b"Reply Yes to opt in or No to opt out."
    assert encode(pdu) == RECORDED_SUBMIT_SM


def test_bind_transmitter_encodes_as_the_spec_lays_it_out() -> None:
    body = b"SMPP3TEST\0secret08\0SUBMIT1\0" + bytes((0x34, 1, 1)) + b"\0"
    expected = _header(16 + len(body), 0x00000002, 0, 1) + body
    params: dict[str, object] = {
        "system_id": "SMPP3TEST",
        "password": "secret08",
        "system_type": "SUBMIT1",
        "interface_version": 0x34,
        "addr_ton": 1,
        "addr_npi": 1,
        "address_range": "",
    }
    assert encode(Pdu("bind_transmitter", 1, params=params)) == expected
    assert decode(expected).params == params


@pytest.mark.parametrize(
    ("pdu", "wire"),
    [
        (Pdu("enquire_link", 7), _header(16, 0x00000015, 0, 7)),
        (Pdu("enquire_link_resp", 7), _header(16, 0x80000015, 0, 7)),
        (Pdu("unbind", 2), _header(16, 0x00000006, 0, 2)),
        (Pdu("generic_nack", 9, 3), _header(16, 0x80000000, 3, 9)),
        (
            Pdu("submit_sm_resp", 5, params={"message_id": "abc"}),
            _header(20, 0x80000004, 0, 5) + b"abc\0",
        ),
        (
            Pdu("deliver_sm_resp", 4, params={}),
            _header(17, 0x80000005, 0, 4) + b"\0",
        ),
    ],
    ids=lambda v: v.command if isinstance(v, Pdu) else "",
)
def test_header_only_and_small_pdus(pdu: Pdu, wire: bytes) -> None:
    assert encode(pdu) == wire
    assert decode(wire).command == pdu.command


def test_deliver_sm_tlvs_are_written_as_type_length_value() -> None:
    wire = encode(Pdu("deliver_sm", 1, params={"receipted_message_id": "ab", "message_state": 2}))
    assert wire.endswith(bytes.fromhex("0427 0001 02 001E 0003 616200".replace(" ", "")))


def test_reader_splits_frames_across_chunks() -> None:
    reader = PduReader()
    stream = SPEC_SUBMIT_SM + _header(16, 0x15, 0, 1)
    frames = [frame for i in range(0, len(stream), 7) for frame in reader.feed(stream[i : i + 7])]
    assert frames == [SPEC_SUBMIT_SM, _header(16, 0x15, 0, 1)]


class RawClient:
    """An ESME made of bytes: writes PDUs, reads frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = PduReader()
        self.frames: list[bytes] = []

    async def send(self, pdu: Pdu) -> None:
        await self.stream.send_all(encode(pdu))

    async def read(self) -> Pdu:
        with trio.fail_after(5):
            while not self.frames:
                data = await self.stream.receive_some(65536)
                assert data, "the fake closed the connection"
                self.frames += self.reader.feed(data)
        return decode(self.frames.pop(0))

    async def closed(self) -> bool:
        with trio.fail_after(5):
            return await self.stream.receive_some(65536) == b""


@asynccontextmanager
async def _client(smsc: FakeSmsc, password: str = "pw") -> AsyncIterator[RawClient]:
    """A raw client that has sent a bind_transceiver (not yet answered)."""
    async with await trio.open_tcp_stream("127.0.0.1", smsc.port) as stream:
        client = RawClient(stream)
        await client.send(
            Pdu("bind_transceiver", 1, params={"system_id": "esme", "password": password})
        )
        yield client


async def test_fake_answers_a_bind() -> None:
    async with open_fake_smsc() as smsc, _client(smsc) as client:
        answer = await client.read()
        assert (answer.command, answer.sequence, answer.status) == (
            "bind_transceiver_resp",
            1,
            0,
        )
        assert answer.params["system_id"] == "fakesmsc"
        assert [c.system_id for c in smsc.bound] == ["esme"]


async def test_fake_refuses_a_wrong_password() -> None:
    async with open_fake_smsc(password="right") as smsc, _client(smsc, "wrong") as client:
        answer = await client.read()
        assert answer.status == RINVPASWD
        assert smsc.bound == []


async def test_fake_answers_submits_as_scripted() -> None:
    async with open_fake_smsc(id_format=lambda n: f"id{n}") as smsc:
        smsc.script_submits(SubmitAnswer(status=RTHROTTLED), SubmitAnswer(message_id="X9"))
        async with _client(smsc) as client:
            await client.read()
            for seq in (2, 3, 4):
                await client.send(Pdu("submit_sm", seq, params={"destination_addr": "1"}))
            answers = {pdu.sequence: pdu for pdu in [await client.read() for _ in range(3)]}
            assert answers[2].status == RTHROTTLED
            assert answers[3].params["message_id"] == "X9"
            assert answers[4].params["message_id"] == "id1"
            assert len(smsc.submits) == 3


async def test_fake_can_hold_back_an_answer() -> None:
    async with open_fake_smsc() as smsc:
        smsc.script_submits(SubmitAnswer(respond=False), SubmitAnswer(delay=0.05))
        async with _client(smsc) as client:
            await client.read()
            await client.send(Pdu("submit_sm", 2))
            await client.send(Pdu("submit_sm", 3))
            assert (await client.read()).sequence == 3
            assert not client.frames


async def test_fake_answers_enquire_link_unless_told_not_to() -> None:
    async with open_fake_smsc() as smsc, _client(smsc) as client:
        await client.read()
        await client.send(Pdu("enquire_link", 2))
        assert (await client.read()).command == "enquire_link_resp"
        smsc.answer_enquire_link = False
        await client.send(Pdu("enquire_link", 3))
        await client.send(Pdu("unbind", 4))
        assert (await client.read()).command == "unbind_resp"


async def test_fake_sends_deliver_sm_and_returns_the_answer() -> None:
    async with open_fake_smsc() as smsc, _client(smsc) as client:
        await client.read()
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                request = await client.read()
                assert request.command == "deliver_sm"
                assert request.params["short_message"] == receipt_text("42").encode()
                await client.send(Pdu("deliver_sm_resp", request.sequence))

            nursery.start_soon(answer)
            response = await smsc.send_receipt("42")
        assert response.command == "deliver_sm_resp"


async def test_fake_drops_connections() -> None:
    async with open_fake_smsc() as smsc, _client(smsc) as client:
        await client.read()
        await smsc.drop_connections()
        assert await client.closed()


async def test_fake_reports_unused_script() -> None:
    async with open_fake_smsc(check_script=False) as smsc:
        smsc.script_submits(SubmitAnswer())
        with pytest.raises(AssertionError, match="unused"):
            smsc.assert_script_used()


# --- misbehaviour (fault scenario 6) --------------------------------------------------------


async def test_fake_drops_a_connection_mid_pdu() -> None:
    async with open_fake_smsc() as smsc, _client(smsc) as client:
        await client.read()
        await smsc.drop_mid_pdu()
        with trio.fail_after(5):
            received = b""
            while chunk := await client.stream.receive_some(65536):
                received += chunk
        (length,) = struct.unpack_from(">L", received)
        assert 16 <= len(received) < length
        assert client.reader.feed(received) == []
        assert smsc.bound == []


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_is_what_its_name_says(name: str) -> None:
    data = GARBAGE[name]
    reader = PduReader()
    if name in FRAMED_GARBAGE:
        [frame] = reader.feed(data)
        with pytest.raises(PduError):
            decode(frame)
    elif name == "truncated_body":
        assert reader.feed(data) == []
        assert reader.buffered == len(data)
    else:
        with pytest.raises(FramingError, match="command_length"):
            reader.feed(data)


async def test_fake_sends_garbage_verbatim() -> None:
    async with open_fake_smsc() as smsc, _client(smsc) as client:
        await client.read()
        await smsc.send_raw(GARBAGE["command_length_0"])
        with trio.fail_after(5):
            assert await client.stream.receive_some(65536) == GARBAGE["command_length_0"]


async def test_fake_throttles_every_submit_for_a_while() -> None:
    async with open_fake_smsc() as smsc, _client(smsc) as client:
        await client.read()
        smsc.throttle_for(60)
        for seq in (2, 3):
            await client.send(Pdu("submit_sm", seq, params={"destination_addr": "1"}))
        assert {(await client.read()).status for _ in range(2)} == {RTHROTTLED}
        smsc.throttle_for(0)
        await client.send(Pdu("submit_sm", 4, params={"destination_addr": "1"}))
        answer = await client.read()
        assert (answer.status, answer.sequence) == (0, 4)
        assert smsc.throttled == 2
        assert len(smsc.submits) == 3
        assert [pdu.sequence for pdu in smsc.accepted] == [4]


async def test_fake_floods_deliver_sm_and_collects_the_answers() -> None:
    contents = [f"mo {n}".encode() for n in range(500)]
    async with open_fake_smsc() as smsc, _client(smsc) as client:
        await client.read()

        async def answer_every_other_one() -> None:
            for n in range(len(contents)):
                request = await client.read()
                assert request.command == "deliver_sm"
                assert request.params["short_message"] == contents[n]
                status = 0 if n % 2 == 0 else RX_T_APPN
                await client.send(Pdu("deliver_sm_resp", request.sequence, status))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_every_other_one)
            with trio.fail_after(10):
                result = await smsc.flood_deliver_sm(contents)
        assert result.acked == contents[::2]
        assert result.not_acked == contents[1::2]
        assert result.unanswered == []


async def test_fake_flood_ends_when_the_client_goes() -> None:
    contents = [f"mo {n}".encode() for n in range(3000)]
    async with open_fake_smsc() as smsc:
        async with _client(smsc) as client:
            await client.read()
            async with trio.open_nursery() as nursery:

                async def answer_ten_then_leave() -> None:
                    for _ in range(10):
                        request = await client.read()
                        await client.send(Pdu("deliver_sm_resp", request.sequence))
                    await client.stream.aclose()

                nursery.start_soon(answer_ten_then_leave)
                with trio.fail_after(10):
                    result = await smsc.flood_deliver_sm(contents)
        assert result.acked == contents[:10]
        assert result.unanswered == contents[10:]
