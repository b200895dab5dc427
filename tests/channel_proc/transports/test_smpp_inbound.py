"""The smpp transport's inbound side against the fake SMSC: messages, multipart, receipts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from channel_proc.transports.smpp.pdu import STATUS_CODES
from tests.channel_proc.transports.test_smpp import message, new_link, send, smpp_channel
from tests.fakes.fake_smsc import SubmitAnswer, open_fake_smsc, receipt_text

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ipc.payloads import VumiEvent, VumiMessage
    from tests.channel_proc.transports.harness import MemoryLink

ROK = 0
RDELIVERYFAILURE = STATUS_CODES["ESME_RDELIVERYFAILURE"]


async def next_event(link: MemoryLink) -> VumiEvent:
    with trio.fail_after(5):
        return await link.events_recv.receive()


def no_event(link: MemoryLink) -> bool:
    try:
        link.events_recv.receive_nowait()
    except trio.WouldBlock:
        return True
    return False


# --- inbound messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundCase:
    label: str
    params: Mapping[str, object]
    #: The inbound message's content, or None when none must be produced.
    content: str | None
    status: int = ROK
    config: Mapping[str, Any] = field(default_factory=dict)
    command: str = "deliver_sm"


INBOUND_CASES = [
    InboundCase(label="gsm", params={"short_message": b"Hi \x00 \x02"}, content="Hi @ $"),
    InboundCase(label="gsm-extension", params={"short_message": b"\x1b(\x1be\x1b)"}, content="{€}"),
    InboundCase(
        label="ucs2",
        params={"short_message": "Привет".encode("utf-16-be"), "data_coding": 8},
        content="Привет",
    ),
    InboundCase(label="utf8-in-default", params={"short_message": b"Zo\xc3\xab"}, content="Zoë"),
    InboundCase(
        label="override",
        params={"short_message": b"caf\xe9"},
        config={"data_coding_overrides": {"0": "latin-1"}},
        content="café",
    ),
    InboundCase(
        label="latin-1", params={"short_message": b"caf\xe9", "data_coding": 3}, content="café"
    ),
    InboundCase(label="message-payload", params={"message_payload": b"1" * 255}, content="1" * 255),
    InboundCase(
        label="data-sm",
        params={"message_payload": b"via data_sm", "data_coding": 1},
        content="via data_sm",
        command="data_sm",
    ),
    InboundCase(
        label="binary-refused",
        params={"short_message": b"\x00\xff", "data_coding": 4},
        content=None,
        status=RDELIVERYFAILURE,
    ),
    InboundCase(
        label="odd-ucs2-refused-with-configured-status",
        params={"short_message": b"abc", "data_coding": 8},
        config={"deliver_sm_decoding_error": "ESME_RSYSERR"},
        content=None,
        status=STATUS_CODES["ESME_RSYSERR"],
    ),
    InboundCase(label="empty-refused", params={}, content=None, status=RDELIVERYFAILURE),
    InboundCase(
        label="empty-allowed", params={}, config={"allow_empty_messages": True}, content=""
    ),
    InboundCase(
        label="receipt-like-text-without-esm-class",
        params={"short_message": receipt_text("x").encode()},
        content=receipt_text("x"),
    ),
]


@pytest.mark.parametrize("case", INBOUND_CASES, ids=lambda c: c.label)
async def test_inbound(case: InboundCase) -> None:
    params = {"source_addr": "27820000002", "destination_addr": "4567", **case.params}
    async with open_fake_smsc() as smsc, smpp_channel(smsc, **case.config) as (_, link):
        command = "data_sm" if case.command == "data_sm" else "deliver_sm"
        if command == "data_sm":
            params.setdefault("data_coding", 0)
            params.setdefault("esm_class", 0)
        response = await smsc.send_request(command, params)
        assert response.command == f"{command}_resp"
        assert response.status == case.status
        produced = link.pending_inbound()
    if case.content is None:
        assert produced == []
        return
    [msg] = produced
    assert (msg.from_addr, msg.to_addr, msg.content) == ("27820000002", "4567", case.content)
    assert msg.transport_type == "sms"
    assert msg.helper_metadata == {}


async def test_deliver_sm_is_answered_only_after_the_link_queued_it() -> None:
    link = new_link()
    async with open_fake_smsc() as smsc, smpp_channel(smsc, link):
        # Fill the link's inbound channel so the next inbound() blocks.
        for _ in range(1024):
            link.inbound_send.send_nowait(message())
        answers: list[int] = []

        async def deliver() -> None:
            answers.append((await smsc.send_deliver_sm(short_message=b"later")).status)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            with trio.fail_after(5):
                await smsc.wait_for("submit_sm", 0)
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []
            assert smsc.pdus("deliver_sm_resp") == []
            link.pending_inbound()
        assert answers == [ROK]


# --- multipart -----------------------------------------------------------------------------


def udh(ref: int, total: int, index: int, text: bytes) -> dict[str, object]:
    return {"esm_class": 0x40, "short_message": bytes((5, 0, 3, ref, total, index)) + text}


def sar(ref: int, total: int, index: int, text: bytes) -> dict[str, object]:
    return {
        "short_message": text,
        "sar_msg_ref_num": ref,
        "sar_total_segments": total,
        "sar_segment_seqnum": index,
    }


def udh16(ref: int, total: int, index: int, text: bytes) -> dict[str, object]:
    header = bytes((6, 8, 4)) + ref.to_bytes(2, "big") + bytes((total, index))
    return {"esm_class": 0x40, "short_message": header + text}


PARTS = [b"back", b" at", b" you"]


@pytest.mark.parametrize(
    ("label", "build", "order"),
    [
        ("udh", udh, [1, 2, 3]),
        ("udh-out-of-order", udh, [3, 1, 2]),
        ("sar", sar, [1, 2, 3]),
        ("udh-16bit", udh16, [2, 3, 1]),
    ],
)
async def test_multipart_inbound_is_reassembled(label: str, build: Any, order: list[int]) -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (_, link):
        for index in order:
            response = await smsc.send_deliver_sm(**build(300 % 256, 3, index, PARTS[index - 1]))
            assert response.ok
            if index != order[-1]:
                assert link.pending_inbound() == []
        [msg] = link.pending_inbound()
    assert msg.content == "back at you"
    assert msg.from_addr == "27820000000"


async def test_multipart_ucs2_decoded_after_reassembly() -> None:
    data = "жжж".encode("utf-16-be")
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (_, link):
        # Split mid-character: only the whole message decodes.
        await smsc.send_deliver_sm(data_coding=8, **udh(9, 2, 1, data[:3]))
        await smsc.send_deliver_sm(data_coding=8, **udh(9, 2, 2, data[3:]))
        [msg] = link.pending_inbound()
    assert msg.content == "жжж"


async def test_multipart_parts_survive_a_restart() -> None:
    link = new_link()
    async with open_fake_smsc() as smsc:
        async with smpp_channel(smsc, link):
            for index in (1, 2):
                assert (await smsc.send_deliver_sm(**udh(7, 3, index, PARTS[index - 1]))).ok
        async with smpp_channel(smsc, link):
            await smsc.wait_bound()
            assert (await smsc.send_deliver_sm(**udh(7, 3, 3, PARTS[2]))).ok
            [msg] = link.pending_inbound()
    assert msg.content == "back at you"
    assert not any(key.startswith("parts:") for key in link.notes_data)


async def test_incomplete_multipart_is_delivered_after_the_timeout() -> None:
    async with (
        open_fake_smsc() as smsc,
        smpp_channel(smsc, multipart_reassembly_timeout=0.2) as (_, link),
    ):
        await smsc.send_deliver_sm(**udh(5, 3, 1, b"only"))
        await smsc.send_deliver_sm(**udh(5, 3, 3, b" this"))
        msg = await link.next_inbound()
    assert msg.content == "only this"
    assert msg.transport_metadata == {"multipart_incomplete": {"parts": 3, "missing": [2]}}


# --- delivery receipts -------------------------------------------------------------------


async def _sent(transport: Any, content: str = "hello") -> VumiMessage:
    msg = message(content)
    await send(transport, msg)
    return msg


@pytest.mark.parametrize(
    ("id_format", "receipt_id"),
    [
        (lambda n: f"abc{n}", lambda n: f"abc{n}"),
        (lambda n: f"0000ABC{n}", lambda n: f"abc{n}"),
        (lambda n: format(0xA1B2C0 + n, "X"), lambda n: str(0xA1B2C0 + n)),
        (lambda n: str(77000 + n), lambda n: format(77000 + n, "x")),
        (lambda n: str(77000 + n), lambda n: f"{77000 + n:012d}"),
    ],
    ids=["same", "padded-upper", "hex-to-decimal", "decimal-to-hex", "zero-padded"],
)
async def test_receipt_matches_the_smsc_id_in_any_form(id_format: Any, receipt_id: Any) -> None:
    async with open_fake_smsc(id_format=id_format) as smsc, smpp_channel(smsc) as (transport, link):
        msg = await _sent(transport)
        assert (await smsc.send_receipt(receipt_id(1))).ok
        event = await next_event(link)
    assert event.event_type.value == "delivery_report"
    assert event.user_message_id == msg.message_id
    assert event.delivery_status is not None
    assert event.delivery_status.value == "delivered"
    assert event.transport_metadata == {"smpp_delivery_status": "DELIVRD"}


@pytest.mark.parametrize(
    ("stat", "tlv_state", "status"),
    [
        ("DELIVRD", None, "delivered"),
        ("UNDELIV", None, "pending"),
        ("REJECTD", None, "failed"),
        ("EXPIRED", None, "failed"),
        ("", 2, "delivered"),
        ("", 1, "pending"),
        ("", 5, "failed"),
    ],
)
async def test_receipt_status(stat: str, tlv_state: int | None, status: str) -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, link):
        await _sent(transport)
        await smsc.send_receipt("1", stat, tlv_state=tlv_state)
        event = await next_event(link)
    assert event.delivery_status is not None
    assert event.delivery_status.value == status


async def test_receipt_before_its_submit_sm_resp_is_matched_later() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, link):
        smsc.script_submits(SubmitAnswer(delay=0.2, message_id="early"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sent, transport)
            with trio.fail_after(5):
                await smsc.wait_for("submit_sm")
            assert (await smsc.send_receipt("EARLY")).ok
            assert no_event(link)
        event = await next_event(link)
    assert event.delivery_status is not None
    assert event.delivery_status.value == "delivered"


async def test_receipt_after_a_restart_finds_its_message() -> None:
    link = new_link()
    async with open_fake_smsc() as smsc:
        async with smpp_channel(smsc, link) as (transport, _):
            msg = await _sent(transport)
        async with smpp_channel(smsc, link):
            await smsc.wait_bound()
            await smsc.send_receipt("1")
            event = await next_event(link)
    assert event.user_message_id == msg.message_id


async def test_multipart_receipts_are_combined() -> None:
    long = "x" * 200
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, link):
        delivered = await _sent(transport, long)
        failed = await _sent(transport, long)
        await smsc.send_receipt("1", "ENROUTE")
        event = await next_event(link)
        assert (event.user_message_id, event.delivery_status) == (delivered.message_id, "pending")
        for smsc_id, stat in (("2", "ENROUTE"), ("1", "DELIVRD"), ("3", "DELIVRD")):
            await smsc.send_receipt(smsc_id, stat)
        assert no_event(link)
        await smsc.send_receipt("2", "DELIVRD")
        event = await next_event(link)
        assert (event.user_message_id, event.delivery_status) == (delivered.message_id, "delivered")
        await smsc.send_receipt("4", "REJECTD")
        event = await next_event(link)
        assert (event.user_message_id, event.delivery_status) == (failed.message_id, "failed")
        for smsc_id in ("4", "2"):
            await smsc.send_receipt(smsc_id, "DELIVRD")
        assert no_event(link)


async def test_receipts_not_reported_when_disabled() -> None:
    async with (
        open_fake_smsc() as smsc,
        smpp_channel(smsc, disable_delivery_report=True) as (transport, link),
    ):
        await _sent(transport)
        assert (await smsc.send_receipt("1")).ok
        assert no_event(link)


@pytest.mark.parametrize(
    "params",
    [
        {"esm_class": 4, "short_message": b"garbled receipt"},
        {"esm_class": 4, "short_message": receipt_text("unknown-id").encode()},
    ],
    ids=["unparseable", "unknown-id"],
)
async def test_unusable_receipts_are_acknowledged_and_dropped(params: dict[str, object]) -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (_, link):
        assert (await smsc.send_deliver_sm(**params)).ok
        assert no_event(link)
        assert link.pending_inbound() == []


async def test_receipt_regex_without_esm_class() -> None:
    overrides: dict[str, Any] = {
        "delivery_report_processor_config": {
            "delivery_report_use_esm_class": False,
            "delivery_report_regex": r"msg (?P<id>\w+) (?P<stat>\w+)",
            "delivery_report_status_mapping": {"OK": "delivered", "KO": "failed"},
        }
    }
    async with open_fake_smsc() as smsc, smpp_channel(smsc, **overrides) as (transport, link):
        msg = await _sent(transport)
        await smsc.send_deliver_sm(short_message=b"msg 1 KO")
        event = await next_event(link)
        await smsc.send_deliver_sm(short_message=b"just a message")
        inbound = await link.next_inbound()
    assert (event.user_message_id, event.delivery_status) == (msg.message_id, "failed")
    assert inbound.content == "just a message"
