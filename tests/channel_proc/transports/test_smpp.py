"""The smpp transport against the fake SMSC: binds, keep-alive, reconnects and sending."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from channel_proc.transports.errors import ConnectionFailed, ProviderRejected
from channel_proc.transports.smpp import SmppConfig, SmppTransport
from ipc.payloads import VumiMessage
from tests.channel_proc.transports.harness import MemoryLink
from tests.fakes.fake_smsc import (
    FRAMED_GARBAGE,
    GARBAGE,
    RINVDSTADR,
    RMSGQFUL,
    RTHROTTLED,
    FakeSmsc,
    SubmitAnswer,
    open_fake_smsc,
    smpp_config,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from channel_proc.transports.base import SendReceipt
    from channel_proc.transports.smpp.pdu import Pdu


def new_link() -> MemoryLink:
    # Room for every status a reconnecting test produces without reading them.
    return MemoryLink(size=1024)


@asynccontextmanager
async def smpp_channel(
    smsc: FakeSmsc, link: MemoryLink | None = None, **overrides: Any
) -> AsyncIterator[tuple[SmppTransport, MemoryLink]]:
    """Run an smpp transport bound to `smsc` for the block (started() awaited)."""
    link = link or new_link()
    config = SmppConfig.model_validate(smpp_config(smsc, **overrides))
    transport = SmppTransport(config, link)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(transport.run)
        yield transport, link
        nursery.cancel_scope.cancel()


def message(content: str = "hello", **fields: Any) -> VumiMessage:
    return VumiMessage(to_addr="27820000001", from_addr="12345", content=content, **fields)


async def send(transport: SmppTransport, msg: VumiMessage) -> SendReceipt:
    with trio.fail_after(5):
        return await transport.send(msg)


async def wait_status(link: MemoryLink, type_: str) -> dict[str, Any]:
    report = await link.wait_status(type_)
    return {"level": report.level.value, "message": report.message, **report.details}


# --- binds ---------------------------------------------------------------------------------


async def test_bind_transceiver_sends_the_configured_credentials() -> None:
    async with (
        open_fake_smsc() as smsc,
        smpp_channel(smsc, password="longer-than-8", system_type="www", address_range="^123") as (
            _,
            link,
        ),
    ):
        [bind] = smsc.pdus("bind_transceiver")
        assert bind.params["system_id"] == "esme"
        assert bind.params["password"] == "longer-t"
        assert bind.params["system_type"] == "www"
        assert bind.params["interface_version"] == 0x34
        assert bind.params["address_range"] == "^123"
        assert (await wait_status(link, "binding"))["level"] == "down"
        bound = await wait_status(link, "bound")
        assert bound["level"] == "ok"
        assert bound["port"] == smsc.port


async def test_bind_transmitter_and_receiver_pair() -> None:
    async with (
        open_fake_smsc() as smsc,
        smpp_channel(smsc, bind_type="transmitter_receiver") as (transport, link),
    ):
        await smsc.wait_bound(2)
        assert {c.bind for c in smsc.bound} == {"bind_transmitter", "bind_receiver"}
        await send(transport, message())
        [submit] = smsc.submits
        assert submit.params["destination_addr"] == "27820000001"
        response = await smsc.send_deliver_sm(short_message=b"mo")
        assert response.ok
        assert (await link.next_inbound()).content == "mo"


async def test_bad_credentials_are_reported_down_and_retried_slowly() -> None:
    async with (
        open_fake_smsc(password="right") as smsc,
        smpp_channel(smsc, password="wrong") as (transport, link),
    ):
        failed = await wait_status(link, "bind_failed")
        assert failed["level"] == "down"
        assert "ESME_RINVPASWD" in failed["message"]
        assert failed["retry_in"] >= 60
        with pytest.raises(ConnectionFailed):
            await send(transport, message())
        assert smsc.submits == []


@pytest.mark.slow
async def test_unanswered_bind_times_out_and_is_retried() -> None:
    async with open_fake_smsc() as smsc:
        smsc.script_binds(None)
        async with smpp_channel(smsc, smpp_bind_timeout=0.2) as (transport, link):
            failed = await wait_status(link, "bind_failed")
            assert failed["message"] == "Timed out awaiting bind (0.2 s)"
            await wait_status(link, "bound")
            await send(transport, message())
    assert len(smsc.pdus("bind_transceiver")) == 2


@pytest.mark.slow
async def test_keepalive_enquire_link_and_rebind_when_unanswered() -> None:
    async with (
        open_fake_smsc() as smsc,
        smpp_channel(smsc, smpp_enquire_link_interval=0.1) as (transport, link),
    ):
        with trio.fail_after(5):
            await smsc.wait_for("enquire_link", 2)
        smsc.answer_enquire_link = False
        lost = await wait_status(link, "connection_lost")
        assert "enquire_link_resp" in lost["message"]
        smsc.answer_enquire_link = True
        await wait_status(link, "bound")
        assert len(smsc.pdus("bind_transceiver")) == 2
        await send(transport, message())


async def test_smsc_enquire_link_is_answered() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc):
        response = await smsc.send_request("enquire_link", {})
        assert response.command == "enquire_link_resp"


async def test_smsc_unbind_is_answered_and_the_channel_rebinds() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, link):
        response = await smsc.send_request("unbind", {})
        assert response.command == "unbind_resp"
        assert "unbound by the SMSC" in (await wait_status(link, "connection_lost"))["message"]
        await wait_status(link, "bound")
        await send(transport, message())


async def test_connection_drop_reconnects() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, link):
        await smsc.drop_connections()
        assert (await wait_status(link, "connection_lost"))["level"] == "down"
        await wait_status(link, "bound")
        await send(transport, message())
        assert len(smsc.submits) == 1


async def test_connection_dropped_mid_pdu_reconnects() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, link):
        await smsc.drop_mid_pdu()
        lost = await wait_status(link, "connection_lost")
        assert lost["message"] == "Connection lost: closed by the SMSC"
        await wait_status(link, "bound")
        await send(transport, message())
    # The half deliver_sm was never answered (the SMSC delivers it again) nor delivered.
    assert link.pending_inbound() == []


#: What the channel says when it drops the connection over each kind of GARBAGE.
GARBAGE_LOSS = {
    "random": "invalid command_length",
    "command_length_0": "invalid command_length 0",
    "command_length_3": "invalid command_length 3",
    "command_length_2_31": f"invalid command_length {2**31}",
    "truncated_body": "36 bytes of a PDU, and no more for 0.3 s",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name == "truncated_body" else name
        for name in sorted(GARBAGE_LOSS)
    ],
)
async def test_garbage_that_breaks_the_framing_drops_the_connection(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        open_fake_smsc() as smsc,
        smpp_channel(smsc, smpp_bind_timeout=0.3) as (transport, link),
    ):
        await smsc.send_raw(GARBAGE[name])
        lost = await wait_status(link, "connection_lost")
        assert lost["message"].startswith("Connection lost: unreadable stream: ")
        assert GARBAGE_LOSS[name] in lost["message"]
        await wait_status(link, "bound")
        await send(transport, message())
    assert len(smsc.pdus("bind_transceiver")) == 2
    assert GARBAGE_LOSS[name] in caplog.text


@pytest.mark.parametrize("name", sorted(FRAMED_GARBAGE))
async def test_framed_garbage_is_answered_and_the_bind_stays(name: str) -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, link):

        def answers() -> list[Pdu]:
            return smsc.pdus("generic_nack") + smsc.pdus("deliver_sm_resp")

        await smsc.send_raw(GARBAGE[name])
        with trio.fail_after(5):
            await smsc.wait_until(lambda: bool(answers()))
        [answer] = answers()
        assert answer.status != 0
        await send(transport, message())
    assert len(smsc.pdus("bind_transceiver")) == 1
    assert link.pending_inbound() == []


async def test_stop_unbinds() -> None:
    async with open_fake_smsc() as smsc:
        link = new_link()
        async with smpp_channel(smsc, link):
            pass
        assert smsc.pdus("unbind")
        assert (await wait_status(link, "unbound"))["level"] == "down"


# --- outbound ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundCase:
    label: str
    content: str
    #: (data_coding, esm_class, short_message, TLVs) of each submit_sm, in order.
    expected: list[tuple[int, int, bytes | None, dict[str, object]]]
    config: dict[str, Any] = field(default_factory=dict)


LONG = "x" * 160 + "y"
OUTBOUND_CASES = [
    OutboundCase(label="gsm", content="Hi @ £5", expected=[(0, 0, b"Hi \x00 \x015", {})]),
    OutboundCase(label="gsm-extension", content="{€}", expected=[(0, 0, b"\x1b(\x1be\x1b)", {})]),
    OutboundCase(
        label="ucs2-automatic",
        content="Ωμέγα ✓",
        expected=[(8, 0, "Ωμέγα ✓".encode("utf-16-be"), {})],
    ),
    OutboundCase(
        label="latin-1",
        content="olá",
        config={"submit_sm_encoding": "latin-1", "submit_sm_data_coding": 3},
        expected=[(3, 0, b"ol\xe1", {})],
    ),
    OutboundCase(
        label="udh-parts",
        content=LONG,
        expected=[(0, 0x40, None, {}), (0, 0x40, None, {})],
    ),
    OutboundCase(
        label="sar-parts",
        content=LONG,
        config={"send_multipart_sar": True},
        expected=[
            (0, 0, b"x" * 153, {"sar_total_segments": 2, "sar_segment_seqnum": 1}),
            (0, 0, b"x" * 7 + b"y", {"sar_total_segments": 2, "sar_segment_seqnum": 2}),
        ],
    ),
    OutboundCase(
        label="message-payload",
        content=LONG,
        config={"send_long_messages": True},
        expected=[(0, 0, None, {"message_payload": LONG.encode()})],
    ),
]


@pytest.mark.parametrize("case", OUTBOUND_CASES, ids=lambda c: c.label)
async def test_outbound(case: OutboundCase) -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc, **case.config) as (transport, _):
        receipt = await send(transport, message(case.content))
    submits = smsc.submits
    assert len(submits) == len(case.expected)
    for submit, (coding, esm, short, tlvs) in zip(submits, case.expected, strict=True):
        assert submit.params["data_coding"] == coding
        assert submit.params["esm_class"] == esm
        if short is not None:
            assert submit.params.get("short_message") == short
        assert {k: submit.params.get(k) for k in tlvs} == tlvs
        assert submit.params["source_addr"] == "12345"
        assert submit.params["destination_addr"] == "27820000001"
        assert submit.params["registered_delivery"] == 1
    assert receipt.provider_message_id == ",".join(str(n) for n in range(1, len(submits) + 1))
    assert receipt.publish_ack


async def test_outbound_addressing_comes_from_the_config() -> None:
    overrides: dict[str, Any] = {
        "source_addr_ton": 5,
        "source_addr_npi": 0,
        "dest_addr_ton": 1,
        "dest_addr_npi": 1,
        "service_type": "CMT",
        "registered_delivery": False,
        "disable_ack": True,
    }
    async with open_fake_smsc() as smsc, smpp_channel(smsc, **overrides) as (transport, _):
        receipt = await send(transport, message())
    [submit] = smsc.submits
    assert {k: submit.params[k] for k in overrides if k in submit.params} == {
        "source_addr_ton": 5,
        "source_addr_npi": 0,
        "dest_addr_ton": 1,
        "dest_addr_npi": 1,
        "service_type": "CMT",
        "registered_delivery": 0,
    }
    assert not receipt.publish_ack


async def test_udh_parts_share_one_reference() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, _):
        await send(transport, message(LONG))
    headers = [submit.params["short_message"][:6] for submit in smsc.submits]  # type: ignore[index]
    assert headers[0][:4] == headers[1][:4] == bytes((5, 0, 3, headers[0][3]))
    assert [h[4:] for h in headers] == [bytes((2, 1)), bytes((2, 2))]


@pytest.mark.parametrize(
    ("status", "reason"),
    [(RINVDSTADR, "ESME_RINVDSTADR"), (0x00000045, "ESME_RSUBMITFAIL"), (0x400, "0x00000400")],
)
async def test_error_status_rejects_with_its_name(status: int, reason: str) -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, _):
        smsc.script_submits(SubmitAnswer(status=status))
        with pytest.raises(ProviderRejected) as info:
            await send(transport, message())
    assert info.value.reason == reason


@pytest.mark.parametrize("address", ["2782é", None])
async def test_invalid_address_is_rejected_without_a_submit(address: str | None) -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, _):
        with pytest.raises(ProviderRejected, match="Invalid to_addr"):
            await send(transport, VumiMessage(to_addr=address, content="x"))
    assert smsc.submits == []


async def test_throttling_pauses_the_bind_and_retries_the_same_pdu() -> None:
    async with (
        open_fake_smsc() as smsc,
        smpp_channel(smsc, throttle_delay=0.1) as (transport, link),
    ):
        smsc.script_submits(SubmitAnswer(status=RTHROTTLED), SubmitAnswer(status=RMSGQFUL))
        started = trio.current_time()
        receipt = await send(transport, message("first"))
        assert trio.current_time() - started >= 0.2
        assert receipt.provider_message_id == "1"
        throttled = await wait_status(link, "throttled")
        assert throttled["level"] == "degraded"
        assert (await wait_status(link, "throttled_end"))["level"] == "ok"
        await send(transport, message("second"))
    contents = [submit.params["short_message"] for submit in smsc.submits]
    assert contents == [b"first", b"first", b"first", b"second"]


async def test_mt_tps_paces_each_pdu() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc, mt_tps=10) as (transport, _):
        started = trio.current_time()
        await send(transport, message("z" * 400))
        elapsed = trio.current_time() - started
    assert len(smsc.submits) == 3
    assert elapsed >= 0.2


@pytest.mark.slow
async def test_window_limits_outstanding_submits() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc, window=3) as (transport, _):
        smsc.script_submits(*[SubmitAnswer(delay=0.3)] * 6)
        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(send, transport, message(f"m{n}"))
            with trio.fail_after(5):
                await smsc.wait_for("submit_sm", 3)
            await trio.testing.wait_all_tasks_blocked()
            assert len(smsc.submits) == 3
    assert len(smsc.submits) == 6


async def test_reconnect_mid_window_fails_unanswered_sends_for_retry() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, link):
        smsc.script_submits(SubmitAnswer(respond=False), SubmitAnswer(respond=False))
        failures: list[str] = []

        async def attempt(n: int) -> None:
            with pytest.raises(ConnectionFailed) as info:
                await send(transport, message(f"m{n}"))
            failures.append(info.value.reason)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, 1)
            nursery.start_soon(attempt, 2)
            with trio.fail_after(5):
                await smsc.wait_for("submit_sm", 2)
            await smsc.drop_connections()
        assert len(failures) == 2
        await wait_status(link, "connection_lost")
        await wait_status(link, "bound")
        for n in (1, 2):
            await send(transport, message(f"m{n}"))
    assert len(smsc.submits) == 4


async def test_no_response_within_submit_sm_expiry_rebinds_and_retries() -> None:
    async with (
        open_fake_smsc() as smsc,
        smpp_channel(smsc, submit_sm_expiry=0.2) as (transport, link),
    ):
        smsc.script_submits(SubmitAnswer(respond=False))
        with pytest.raises(ConnectionFailed) as info:
            await send(transport, message())
        assert info.value.code == "response_timeout"
        await wait_status(link, "connection_lost")
        await wait_status(link, "bound")
        assert (await send(transport, message())).provider_message_id == "1"


async def test_multipart_resend_sends_only_unacknowledged_parts() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc) as (transport, link):
        smsc.script_submits(SubmitAnswer(message_id="P1"), SubmitAnswer(respond=False))
        msg = message(LONG)

        async def first_attempt() -> None:
            with pytest.raises(ConnectionFailed):
                await send(transport, msg)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_attempt)
            with trio.fail_after(5):
                await smsc.wait_for("submit_sm", 2)
            await smsc.drop_connections()
        await wait_status(link, "connection_lost")
        await wait_status(link, "bound")
        receipt = await send(transport, msg)
    first, second, resent = (s.params["short_message"] for s in smsc.submits)
    assert resent == second
    assert first != second
    assert receipt.provider_message_id == "P1,1"


async def test_message_sent_before_a_restart_is_not_sent_again() -> None:
    link = new_link()
    msg = message("once")
    async with open_fake_smsc() as smsc:
        async with smpp_channel(smsc, link) as (transport, _):
            first = await send(transport, msg)
        async with smpp_channel(smsc, link) as (transport, _):
            again = await send(transport, msg)
    assert len(smsc.submits) == 1
    assert again.provider_message_id == first.provider_message_id == "1"


async def test_not_bound_is_a_retryable_failure() -> None:
    async with open_fake_smsc(password="right") as smsc, smpp_channel(smsc) as (transport, _):
        with pytest.raises(ConnectionFailed) as info:
            await send(transport, message())
    assert info.value.retryable


async def test_pdu_log_lines_never_show_the_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with open_fake_smsc() as smsc, smpp_channel(smsc, password="s3cr3tpw") as (transport, _):
        await send(transport, message())
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("smpp.pdus")]
    assert any("> bind_transceiver" in line and "system_id=esme" in line for line in lines)
    assert any("> submit_sm seq=" in line for line in lines)
    assert any("< submit_sm_resp" in line and "message_id=1" in line for line in lines)
    assert not any("s3cr3tpw" in r.getMessage() for r in caplog.records)


# --- the window with sends in flight at once -------------------------------------------------


async def send_in_order(
    transport: SmppTransport, msgs: list[VumiMessage], nursery: trio.Nursery
) -> None:
    """Start one send per message, in order, as the outbound actor does."""

    async def call(msg: VumiMessage, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await send(transport, msg)

    for msg in msgs:
        await nursery.start(call, msg)


async def test_throttled_submit_in_a_window_goes_again_before_unwritten_ones() -> None:
    async with (
        open_fake_smsc() as smsc,
        smpp_channel(smsc, window=2, throttle_delay=0.05) as (transport, _),
    ):
        smsc.script_submits(SubmitAnswer(status=RTHROTTLED), SubmitAnswer(delay=0.01))
        async with trio.open_nursery() as nursery:
            await send_in_order(transport, [message(f"m{n}") for n in range(4)], nursery)
    contents = [submit.params["short_message"] for submit in smsc.submits]
    assert contents == [b"m0", b"m1", b"m0", b"m2", b"m3"]


async def test_parts_of_messages_in_a_window_go_out_in_order() -> None:
    async with open_fake_smsc() as smsc, smpp_channel(smsc, window=3) as (transport, _):
        # The first part of the first message is answered last.
        smsc.script_submits(SubmitAnswer(delay=0.05))
        msgs = [message("a" * 160 + "b"), message("c"), message("d" * 160 + "e")]
        async with trio.open_nursery() as nursery:
            await send_in_order(transport, msgs, nursery)
    bodies = [submit.params["short_message"][-1:] for submit in smsc.submits]  # type: ignore[index]
    assert bodies == [b"a", b"b", b"c", b"d", b"e"]
